"""Perplexity regression checks for users' CI: evaluate a recipe, compare with a stored baseline file within
its tolerance, refuse a baseline made for another model or text, and update baselines only when asked."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkquant.artifacts import atomic_write_json, library_versions, read_structured, sha256_file
from sinkquant.data import TokenStream, load_text, plan_windows, tokenize
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, load_model

REQUIRED = ("recipe", "model", "data", "ctx", "windows", "rel_tol")


@dataclass
class Outcome:
    name: str
    ppl: float
    baseline: float | None
    rel_tol: float
    passed: bool

    @property
    def message(self) -> str:
        if self.baseline is None:
            return f"{self.name}: perplexity {self.ppl:.4f} (baseline written)"
        delta = 100 * (self.ppl / self.baseline - 1)
        verdict = "ok" if self.passed else "REGRESSION" if delta > 0 else "IMPROVED beyond tolerance"
        return (f"{self.name}: {verdict}: perplexity {self.ppl:.4f} vs baseline {self.baseline:.4f} "
                f"({delta:+.2f}%, tolerance ±{100 * self.rel_tol:.2f}%)")


@functools.lru_cache(maxsize=2)
def _model(spec: str) -> LoadedModel:
    return load_model(spec)


@functools.lru_cache(maxsize=4)
def _stream(spec: str, data: str) -> TokenStream:
    return tokenize(load_text(data), _model(spec).tokenizer)


def read_baseline(path: Path) -> dict[str, Any]:
    spec = read_structured(path, "baseline")
    if not isinstance(spec, dict):
        raise SinkquantError(f"baseline file {path} must hold a JSON object; required keys: {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise SinkquantError(f"baseline file {path} lacks {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    return spec


def check_baseline(path: str | Path, update: bool = False, progress: bool = False) -> Outcome:
    """Re-evaluate the recipe a baseline names; a missing `ppl` (or `update`) writes the measured one."""
    from sinkquant.engine import apply_recipe
    from sinkquant.recipes import load_recipe

    path = Path(path)
    spec = read_baseline(path)
    recipe = load_recipe(spec["recipe"])
    loaded = _model(spec["model"])
    stream = _stream(spec["model"], spec["data"])
    model_hash, data_hash = loaded.source.get("sha256"), stream.text_sha256
    if not update and "ppl" not in spec:
        raise SinkquantError(f"baseline {path} has no ppl yet; measure it deliberately with --update-baselines "
                             "(pytest: --sinkquant-update-baselines)")
    if not update:
        for field, want, got in (("model_sha256", spec.get("model_sha256"), model_hash),
                                 ("data_sha256", spec.get("data_sha256"), data_hash),
                                 ("recipe_sha256", spec.get("recipe_sha256"), sha256_file(spec["recipe"]))):
            if want != got:
                raise SinkquantError(
                    f"baseline {path} was made with {field} {want}, but this run has {got}; it is not comparable. "
                    "Re-create it deliberately with --update-baselines (pytest: --sinkquant-update-baselines)"
                )
    quantized = apply_recipe(loaded, recipe, stream, ctx=spec["ctx"], copy=True)
    plan = plan_windows(stream, spec["ctx"], spec["windows"], calib_windows=recipe.calibration.windows)
    ppl = quantized.evaluate(stream, plan, bos=spec.get("bos", "auto"), progress=progress).ppl
    if update:
        atomic_write_json(path, {**spec, "ppl": ppl, "model_sha256": model_hash, "data_sha256": data_hash,
                                 "recipe_sha256": sha256_file(spec["recipe"]), "versions": library_versions()})
        return Outcome(name=path.stem, ppl=ppl, baseline=None, rel_tol=spec["rel_tol"], passed=True)
    baseline = spec["ppl"]
    return Outcome(name=path.stem, ppl=ppl, baseline=baseline, rel_tol=spec["rel_tol"],
                   passed=abs(ppl / baseline - 1) <= spec["rel_tol"])
