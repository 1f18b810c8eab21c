"""Perplexity regression checks for users' CI: evaluate a recipe, compare with a stored baseline file within
its tolerance, refuse a baseline made for another model or text, and update baselines only when asked.

A baseline knows its noise floor: updating it measures the recipe once on every CPU kernel path this machine
can run (torch's default and `ATEN_CPU_CAPABILITY=avx2` below it, one subprocess each), because quantized
perplexity moves with kernel rounding while fp32 does not. A check compares with the value of its own kernel
path when the baseline has one, within max(rel_tol, K_SPREAD x the measured spread between paths)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sinkquant.errors import SinkquantError
from sinkquant.io import atomic_write_json, library_versions, read_structured, sha256_file

if TYPE_CHECKING:
    from sinkquant.data import TokenStream
    from sinkquant.models import LoadedModel

# The spread of two kernel paths is the range of two draws of the rounding noise; its expected value is
# d2 = 1.128 standard deviations (the range-to-sigma constant for n = 2), so 3 sigma = 3 / 1.128 = 2.66 ranges.
# K_SPREAD = 3 rounds that up: a third kernel path (another CPU, another BLAS) lands inside the band with ~99.7%
# probability if the noise is roughly normal, while a real regression larger than the noise still fails.
K_SPREAD = 3.0
# x86 kernel paths torch can be forced down to (ATEN_CPU_CAPABILITY), lowest first.
X86_PATHS = ("AVX2", "AVX512")
# Every name torch.backends.cpu.get_cpu_capability() gives: a baseline's `kernels` keys must be one of these.
KERNEL_PATHS = ("DEFAULT", *X86_PATHS, "VSX", "ZVECTOR", "SVE", "SVE128", "SVE256", "SVE512")
# The widest tolerance a baseline may hold: above it a check would pass anything. It bounds rel_tol and the
# measured kernel spread alike (K_SPREAD x spread), so no entry of the file can widen it further.
MAX_TOLERANCE = 0.5
MAX_BASELINE_BYTES = 1 << 20
UPDATE_HINT = ("re-measure it deliberately with `sinkquant check --update-baselines` "
               "(pytest: --sinkquant-update-baselines)")


class KernelValue(BaseModel):
    """One kernel path's measurement: the recipe's perplexity and fp32's on the same windows."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ppl: float = Field(gt=0)
    fp32_ppl: float = Field(gt=0)
    nll: list[float] = Field(default_factory=list, description="the recipe's NLL sum per evaluation window, "
                             "in order (eval/bench_regression_noise.py reads the spread against tokens off it)")

    def metric(self, metric: str) -> float:
        return self.ppl if metric == "ppl" else self.ppl / self.fp32_ppl


class Baseline(BaseModel):
    """A baseline file, validated (strict types, bounds) before any model work."""

    model_config = ConfigDict(extra="forbid", strict=True)
    recipe: str = Field(min_length=1, description="recipe file, relative to the baseline's own folder")
    model: str = Field(min_length=1)
    data: str = Field(min_length=1)
    ctx: int = Field(ge=2, le=32768)
    windows: int = Field(ge=1, le=4096, description="evaluation windows")
    bos: Literal["never", "per-window", "auto"] = "auto"
    metric: Literal["ppl", "ratio"] = Field(
        default="ppl", description="ppl: absolute perplexity; ratio: quantized / fp32 perplexity of the same run")
    rel_tol: float = Field(gt=0, le=MAX_TOLERANCE, description="a tolerance above 50% would check nothing")
    note: str | None = Field(default=None, description="why the tolerance is what it is")
    ppl: float | None = Field(default=None, gt=0, description="mean over kernel paths (or a hand-set value)")
    kernels: dict[str, KernelValue] = Field(default_factory=dict)
    model_sha256: str | None = None
    data_sha256: str | None = None
    recipe_sha256: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)

    def values(self) -> dict[str, float]:
        return {name: value.metric(self.metric) for name, value in self.kernels.items()}

    @model_validator(mode="after")
    def _kernel_paths(self) -> Baseline:
        """Only real kernel paths, and a spread that keeps the tolerance within MAX_TOLERANCE."""
        unknown = sorted(set(self.kernels) - set(KERNEL_PATHS))
        if unknown:
            raise ValueError(f"kernels: {unknown[0]!r} is not a CPU kernel path; valid: {', '.join(KERNEL_PATHS)}")
        if K_SPREAD * self.spread() > MAX_TOLERANCE:
            raise ValueError(f"kernels: the paths' values spread {100 * self.spread():.1f}%, so the tolerance "
                             f"({K_SPREAD:g} x spread = {100 * K_SPREAD * self.spread():.1f}%) would exceed the "
                             f"{100 * MAX_TOLERANCE:.0f}% maximum; {UPDATE_HINT}")
        return self

    def spread(self) -> float:
        """Relative range of the metric over the recorded kernel paths (0 with fewer than two)."""
        values = list(self.values().values())
        return (max(values) - min(values)) / fmean(values) if len(values) > 1 else 0.0

    def tolerance(self) -> float:
        return max(self.rel_tol, K_SPREAD * self.spread())

    def reference(self, kernel: str) -> tuple[float, str]:
        """The value to compare with and the kernel path that produced it."""
        values = self.values()
        if kernel in values:
            return values[kernel], kernel
        if values:
            return fmean(values.values()), "mean of " + "+".join(sorted(values))
        if self.metric == "ppl" and self.ppl is not None:
            return self.ppl, "unrecorded kernel path"
        raise SinkquantError(f"baseline has no measured {self.metric} yet; {UPDATE_HINT}")


@dataclass
class Measurement:
    """One run of a baseline's recipe in this process."""

    kernel: str
    ppl: float
    fp32_ppl: float | None
    nll: list[float]
    model_sha256: str | None
    data_sha256: str
    recipe_sha256: str

    def metric(self, metric: str) -> float:
        if metric == "ppl":
            return self.ppl
        assert self.fp32_ppl is not None, "ratio baselines measure fp32 in the same run"
        return self.ppl / self.fp32_ppl


@dataclass
class Outcome:
    name: str
    metric: str
    value: float
    kernel: str
    baseline: float | None = None
    baseline_kernel: str | None = None
    rel_tol: float = 0.0
    noise_tol: float = 0.0
    passed: bool = True

    @property
    def message(self) -> str:
        what = "perplexity" if self.metric == "ppl" else "quantized/fp32 perplexity ratio"
        if self.baseline is None:
            return (f"{self.name}: {what} {self.value:.4f} on {self.kernel} (baseline written; {K_SPREAD:g} x kernel "
                    f"spread = {100 * self.noise_tol:.2f}%, rel_tol {100 * self.rel_tol:.2f}%)")
        delta = 100 * (self.value / self.baseline - 1)
        verdict = "ok" if self.passed else "REGRESSION" if delta > 0 else "IMPROVED beyond tolerance"
        return (f"{self.name}: {verdict}: {what} {self.value:.4f} on {self.kernel} vs baseline "
                f"{self.baseline:.4f} from {self.baseline_kernel} ({delta:+.2f}%; tolerance "
                f"±{100 * max(self.rel_tol, self.noise_tol):.2f}% = max(rel_tol {100 * self.rel_tol:.2f}%, "
                f"{K_SPREAD:g} x kernel spread = {100 * self.noise_tol:.2f}%))")


def cpu_kernel() -> str:
    """The CPU kernel path torch dispatches to in this process (ATEN_CPU_CAPABILITY can lower it)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _error_line(source: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<top>"
        if err["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key; valid keys: {', '.join(Baseline.model_fields)}")
        else:
            got = err.get("input")
            parts.append(f"{field}: {err['msg']}" + ("" if isinstance(got, dict | list) else f" (got {got!r})"))
    return f"baseline file {source}: " + "; ".join(parts)


def read_baseline(path: str | Path) -> Baseline:
    """Parse and validate a baseline file; every problem is one line naming the file and the field."""
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_BASELINE_BYTES:
        raise SinkquantError(f"baseline file {path} is {path.stat().st_size} bytes; baselines are at most "
                             f"{MAX_BASELINE_BYTES} bytes")
    try:
        data = read_structured(path, "baseline")
    except UnicodeDecodeError as exc:
        raise SinkquantError(f"baseline file {path} is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise SinkquantError(f"baseline file {path} is nested too deeply to be a baseline") from None
    if not isinstance(data, dict):
        raise SinkquantError(f"baseline file {path} must hold a JSON object with keys "
                             f"{', '.join(n for n, f in Baseline.model_fields.items() if f.is_required())}")
    try:
        return Baseline.model_validate(data)
    except ValidationError as exc:
        raise SinkquantError(_error_line(path, exc)) from None


def recipe_path(path: Path, baseline: Baseline) -> Path:
    """A baseline's recipe resolves against the baseline's own folder, so a check runs from anywhere."""
    recipe = Path(baseline.recipe).expanduser()
    recipe = recipe if recipe.is_absolute() else path.parent / recipe
    if not recipe.is_file():
        raise SinkquantError(f"baseline file {path}: recipe {baseline.recipe!r} resolves to {recipe}, "
                             "which is not a file (paths are relative to the baseline's folder)")
    return recipe


@functools.lru_cache(maxsize=2)
def _model(spec: str) -> LoadedModel:
    from sinkquant.models import load_model

    return load_model(spec)


@functools.lru_cache(maxsize=4)
def _stream(spec: str, data: str) -> TokenStream:
    from sinkquant.data import load_text, tokenize

    return tokenize(load_text(data), _model(spec).tokenizer)


def measure(path: str | Path, fp32: bool, progress: bool = False) -> Measurement:
    """Run the baseline's recipe (and fp32 when asked) on its windows in this process, on its kernel path."""
    from tqdm.auto import tqdm

    from sinkquant.data import plan_windows
    from sinkquant.engine import apply_recipe
    from sinkquant.perplexity import evaluate
    from sinkquant.recipe import load_recipe

    path = Path(path)
    spec = read_baseline(path)
    recipe_file = recipe_path(path, spec)
    recipe = load_recipe(recipe_file)
    loaded = _model(spec.model)
    stream = _stream(spec.model, spec.data)
    plan = plan_windows(stream, spec.ctx, spec.windows, calib_windows=recipe.calibration.windows)
    quantized = apply_recipe(loaded, recipe, stream, ctx=spec.ctx, copy=True)  # the model is cached
    # One window at a time (what evaluate does anyway) so the record shows how the noise averages out.
    windows = [quantized.evaluate(stream, replace(plan, eval_windows=(w,)), bos=spec.bos, progress=False)
               for w in tqdm(plan.eval_windows, desc=recipe.name, disable=not progress)]
    ppl = math.exp(sum(r.nll_sum for r in windows) / sum(r.tokens for r in windows))
    fp32_ppl = evaluate(loaded, stream, plan, bos=spec.bos, progress=progress).ppl if fp32 else None
    return Measurement(kernel=cpu_kernel(), ppl=ppl, fp32_ppl=fp32_ppl, nll=[r.nll_sum for r in windows],
                       model_sha256=loaded.source.get("sha256"), data_sha256=stream.text_sha256,
                       recipe_sha256=sha256_file(recipe_file))


def kernel_env(kernel: str | None) -> dict[str, str]:
    """This environment for a subprocess forced to `kernel` (None: torch's default); torch picks its kernel path
    once per process, so each path needs its own interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if kernel is not None:
        env["ATEN_CPU_CAPABILITY"] = kernel.lower()
    return env


def lower_kernel_paths(default: str) -> tuple[str, ...]:
    """The x86 kernel paths below `default` that this CPU can also run (none off x86)."""
    return X86_PATHS[: X86_PATHS.index(default)] if default in X86_PATHS else ()


def _measure_on(kernel: str | None, path: Path, progress: bool) -> Measurement:
    """`measure` in a fresh interpreter on `kernel`."""
    env = kernel_env(kernel)
    argv = [sys.executable, "-m", "sinkquant.regression", str(path)] + (["--progress"] if progress else [])
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines() or [f"exit status {proc.returncode}"]
        raise SinkquantError(f"measuring {path} on kernel path {kernel or 'default'} failed: {lines[-1]}")
    return Measurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


def measure_kernel_paths(path: str | Path, progress: bool = False) -> list[Measurement]:
    """One measurement per distinct kernel path: torch's default first, then each x86 path below it."""
    path = Path(path)
    runs = [_measure_on(None, path, progress)]
    for kernel in lower_kernel_paths(runs[0].kernel):
        run = _measure_on(kernel, path, progress)
        if run.kernel not in {r.kernel for r in runs}:
            runs.append(run)
    return runs


def update_baseline(path: str | Path, progress: bool = False) -> Outcome:
    """Re-measure on every kernel path and rewrite the baseline (keeping its settings and tolerance)."""
    path = Path(path)
    spec = read_baseline(path)
    runs = measure_kernel_paths(path, progress)
    kernels = {r.kernel: KernelValue(ppl=r.ppl, fp32_ppl=r.fp32_ppl, nll=r.nll) for r in runs}
    first = runs[0]
    updated = spec.model_copy(update={
        "ppl": fmean(r.ppl for r in runs), "kernels": kernels, "model_sha256": first.model_sha256,
        "data_sha256": first.data_sha256, "recipe_sha256": first.recipe_sha256, "versions": library_versions()})
    atomic_write_json(path, updated.model_dump(exclude_none=True))
    return Outcome(name=path.stem, metric=spec.metric, value=first.metric(spec.metric), kernel=first.kernel,
                   rel_tol=spec.rel_tol, noise_tol=K_SPREAD * updated.spread())


def check_baseline(path: str | Path, update: bool = False, progress: bool = False) -> Outcome:
    """Re-evaluate the recipe a baseline names and compare; `update` re-measures and rewrites it instead."""
    path = Path(path)
    if update:
        return update_baseline(path, progress)
    spec = read_baseline(path)
    recipe_file = recipe_path(path, spec)
    baseline, baseline_kernel = spec.reference(cpu_kernel())
    loaded = _model(spec.model)
    stream = _stream(spec.model, spec.data)
    for field, want, got in (("model_sha256", spec.model_sha256, loaded.source.get("sha256")),
                             ("data_sha256", spec.data_sha256, stream.text_sha256),
                             ("recipe_sha256", spec.recipe_sha256, sha256_file(recipe_file))):
        if want != got:
            raise SinkquantError(f"baseline {path} was made with {field} {want}, but this run has {got}; it is not "
                                 f"comparable. {UPDATE_HINT[0].upper()}{UPDATE_HINT[1:]}")
    run = measure(path, fp32=spec.metric == "ratio", progress=progress)
    value = run.metric(spec.metric)
    noise_tol = K_SPREAD * spec.spread()
    return Outcome(name=path.stem, metric=spec.metric, value=value, kernel=run.kernel, baseline=baseline,
                   baseline_kernel=baseline_kernel, rel_tol=spec.rel_tol, noise_tol=noise_tol,
                   passed=abs(value / baseline - 1) <= max(spec.rel_tol, noise_tol))


def _main(argv: list[str]) -> int:
    """Worker for `measure_kernel_paths`: measure one baseline here and print the result as one JSON line."""
    import argparse
    from dataclasses import asdict

    parser = argparse.ArgumentParser(prog="python -m sinkquant.regression", description=_main.__doc__)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        run = measure(args.baseline, fp32=True, progress=args.progress)
    except SinkquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(run)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
