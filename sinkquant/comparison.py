"""Side-by-side perplexity of several recipes on the same windows with one shared fp32 baseline.

Each finished row is cached under (model hash, recipe hash, data hash, settings, sinkquant's version and the
hash of its code), so a re-run skips finished work, an interrupted run resumes, and rows of older code are never
reused; a recipe that fails is a row with its error, the others still run. A cache row that cannot be read is
recomputed, with one warning line.

With `onnx`, fp32 and every recipe are also exported to ONNX and run by ONNX Runtime on the same windows, each as
a row of its own ("<recipe> (ONNX Runtime)"); a recipe the exporter refuses is a "refused" row with its reason.
`onnx_peers` adds ONNX Runtime's own int8 quantization of the fp32 ONNX graph (sinkquant.backends.export.
onnx_peers), calibrated on the recipes' calibration windows."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from sinkquant.backends import ONNX_PEERS
from sinkquant.backends.export import export
from sinkquant.backends.export.onnx import MODEL_FILE
from sinkquant.backends.export.onnx_peers import (
    RUNTIME_VERSION,
    graph_bytes,
    onnx_model,
    peer_description,
    peer_label,
    quantize_peer,
    write_fp32_graph,
)
from sinkquant.backends.export.onnx_runtime import load_onnx
from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.engine import QuantizedModel, apply_recipe
from sinkquant.engine.artifact import stored_bytes
from sinkquant.errors import SinkquantError
from sinkquant.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_writable_place,
    code_sha256,
    library_versions,
    sha256_bytes,
    to_json,
)
from sinkquant.models import LoadedModel
from sinkquant.perplexity import Prefix, evaluate
from sinkquant.recipe import Recipe, load_recipe
from sinkquant.tables import markdown_table

log = logging.getLogger(__name__)
FP32 = "fp32"
ONNX_RUNTIME = "onnxruntime"


@dataclass
class Row:
    recipe: str
    description: str
    status: str  # "ok" | "failed" | "refused" (the ONNX exporter cannot express the recipe; `error` says why)
    ppl: float | None = None
    delta_pct: float | None = None
    quantize_seconds: float | None = None
    eval_seconds: float | None = None
    prefix: list[str] | None = None
    weight_bytes: int | None = None  # what the artifact (or ONNX graph) stores, scales included; peers: None
    tokens_per_s: float | None = None  # scored tokens per second of evaluation (simulated layers are slower)
    error: str | None = None
    runtime: str = "torch"  # or ONNX_RUNTIME
    cached: bool = False


# The type each cached field must have: a row edited or truncated on disk is recomputed, not shown.
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (str,), "description": (str,), "status": (str,), "ppl": (float, int), "delta_pct": (float, int),
    "quantize_seconds": (float, int), "eval_seconds": (float, int), "prefix": (list,), "weight_bytes": (int,),
    "tokens_per_s": (float, int), "error": (str,), "runtime": (str,),
    "cached": (bool,),
}
_REQUIRED = {f.name for f in fields(Row) if f.default is MISSING}


def _cache_key(loaded: LoadedModel, recipe_payload: Any, stream: TokenStream, settings: dict[str, Any]) -> str:
    return sha256_bytes(to_json({"model": loaded.source.get("sha256"), "recipe": recipe_payload,
                                 "data": stream.text_sha256, "settings": settings,
                                 "sinkquant": library_versions()["sinkquant"], "code": code_sha256()}).encode())[:24]


def _row_from_cache(path: Path) -> Row:
    """A cached row, checked field by field; ValueError says what is wrong with it."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"holds a JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - set(_ROW_TYPES))
    missing = sorted(_REQUIRED - set(data))
    if unknown or missing:
        raise ValueError(f"unknown fields {unknown}, missing fields {missing}")
    for name, value in data.items():
        wrong_bool = isinstance(value, bool) and bool not in _ROW_TYPES[name]
        if value is not None and (wrong_bool or not isinstance(value, _ROW_TYPES[name])):
            raise ValueError(f"field {name!r} is {value!r}")
    if data["status"] not in ("ok", "failed", "refused") or (data["status"] == "ok" and data.get("ppl") is None):
        raise ValueError(f"status {data['status']!r} with ppl {data.get('ppl')!r}")
    return Row(**{**data, "cached": True})


class _Refused(Exception):
    """The ONNX exporter cannot express a recipe; the message is its one-line reason."""


def _failure(exc: Exception) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"


# What an ONNX Runtime row runs: (the model, its fp prefix or None, its graph file, seconds it took to make).
OnnxMade = tuple[LoadedModel, Prefix | None, Path, float]


def compare(
    loaded: LoadedModel,
    recipe_paths: list[str | Path],
    stream: TokenStream,
    ctx: int = 512,
    max_windows: int | None = 16,
    bos: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    calib_windows: int | None = None,
    onnx: bool = False,
    onnx_peers: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate fp32 and every recipe on the same evaluation windows; returns the comparison as a dict.
    `calib_windows` replaces every recipe's `calibration.windows` (as `quantize --calib-windows` does). `onnx` adds
    each of those rows run by ONNX Runtime; `onnx_peers` (of ONNX_PEERS) adds ONNX Runtime's own quantizations."""

    unknown = [p for p in onnx_peers if p not in ONNX_PEERS]
    if unknown:
        raise SinkquantError(f"onnx_peers {unknown} not valid; valid: {', '.join(ONNX_PEERS)}")
    if cache_dir is not None:  # refused now, not when the first row is stored minutes later
        check_writable_place(cache_dir, "compare cache", inside=True)
    recipes = []
    for path in recipe_paths:
        try:
            recipes.append((str(path), load_recipe(path).with_calib_windows(calib_windows), None))
        except SinkquantError as exc:
            recipes.append((str(path), None, str(exc)))
    calib = max((r.calibration.windows for _, r, _ in recipes if r is not None), default=8)
    plan = plan_windows(stream, ctx, max_windows, calib_windows=calib)
    settings = {"ctx": ctx, "windows": list(plan.eval_windows), "bos": bos, "calib_windows": calib}
    cache = Path(cache_dir) if cache_dir else None

    def cached_row(key: str) -> Row | None:
        if cache is None or not (cache / f"{key}.json").is_file():
            return None
        try:
            return _row_from_cache(cache / f"{key}.json")
        except ValueError as exc:
            log.warning("sinkquant compare: ignoring the cache row %s (%s); recomputing it", cache / f"{key}.json",
                        str(exc).splitlines()[0])
            return None

    def store(key: str, row: Row) -> None:
        if cache is not None and row.status in ("ok", "refused"):
            atomic_write_json(cache / f"{key}.json", {**asdict(row), "cached": False})

    rows: list[Row] = []
    key = _cache_key(loaded, FP32, stream, settings)
    base = cached_row(key)
    if base is None:
        result = evaluate(loaded, stream, plan, bos=bos, progress=progress, desc=FP32)
        weights = {t.data_ptr(): t.numel() * t.element_size() for t in loaded.model.state_dict().values()}
        base = Row(recipe=FP32, description="full precision reference", status="ok", ppl=result.ppl, delta_pct=0.0,
                   quantize_seconds=0.0, eval_seconds=result.seconds, weight_bytes=sum(weights.values()),
                   tokens_per_s=result.tokens / result.seconds)
        store(key, base)
    rows.append(base)

    with tempfile.TemporaryDirectory(prefix="sinkquant-compare-onnx-") as tmp_name:
        ort_rows = _OnnxRows(loaded, stream, plan, bos, Path(tmp_name), base.ppl, progress)

        def through_ort(payload: Any, name: str, description: str, make: Callable[[], OnnxMade],
                        row_bos: str = bos, prefix: list[str] | None = None) -> None:
            row_key = _cache_key(loaded, {"runtime": ONNX_RUNTIME, "version": RUNTIME_VERSION, "row": payload},
                                 stream, settings)
            row = cached_row(row_key)
            if row is None:
                row = ort_rows.row(name, description, make, row_bos, prefix)
                store(row_key, row)
            rows.append(row)

        if onnx or onnx_peers:
            through_ort(FP32, f"{FP32} (ONNX Runtime)", "the fp32 ONNX graph, run by ONNX Runtime", ort_rows.fp32)
        for path, recipe, error in recipes:
            if recipe is None:
                rows.append(Row(recipe=Path(path).stem, description="", status="failed", error=error))
                continue
            key = _cache_key(loaded, recipe.resolved(), stream, settings)
            row = cached_row(key)
            quantized = None
            if row is None:
                try:
                    start = time.perf_counter()
                    quantized = apply_recipe(loaded, recipe, stream, ctx=ctx, copy=True)
                    quantize_seconds = time.perf_counter() - start
                    result = quantized.evaluate(stream, plan, bos=bos, progress=progress)
                    prefix = quantized.prefix_tokens
                    row = Row(recipe=recipe.name, description=recipe.description, status="ok", ppl=result.ppl,
                              delta_pct=100 * (result.ppl / base.ppl - 1), quantize_seconds=quantize_seconds,
                              eval_seconds=result.seconds, prefix=prefix, weight_bytes=stored_bytes(quantized),
                              tokens_per_s=result.tokens / result.seconds)
                except Exception as exc:  # one broken recipe must not sink the comparison
                    row = Row(recipe=recipe.name, description=recipe.description, status="failed",
                              error=_failure(exc))
                store(key, row)
            rows.append(row)
            if onnx and row.status == "ok":  # a prefix replaces the BOS policy, as in QuantizedModel.evaluate
                through_ort(recipe.resolved(), f"{recipe.name} (ONNX Runtime)",
                            f"{recipe.name} exported to ONNX, run by ONNX Runtime",
                            functools.partial(ort_rows.exported, recipe, quantized),
                            "never" if row.prefix is not None else bos, row.prefix)
            del quantized
        for method in onnx_peers:
            through_ort({"peer": method}, peer_label(method), peer_description(method, len(plan.calib_windows)),
                        functools.partial(ort_rows.peer, method))
    return {
        "model": {"spec": loaded.spec, **loaded.source},
        "data": {"sha256": stream.text_sha256, **stream.source, **plan.describe()},
        "settings": settings,
        "versions": library_versions(),
        "code_sha256": code_sha256(),
        "rows": [asdict(r) for r in rows],
    }


class _OnnxRows:
    """The rows ONNX Runtime runs, on as many threads as torch: the fp32 graph (written once, shared by the
    peers), recipes exported to ONNX and ONNX Runtime's own quantizations, all on `plan`'s windows."""

    def __init__(self, loaded: LoadedModel, stream: TokenStream, plan: WindowPlan, bos: str, tmp: Path,
                 base_ppl: float, progress: bool) -> None:
        self.loaded, self.stream, self.plan, self.bos, self.tmp = loaded, stream, plan, bos, tmp
        self.base_ppl, self.progress = base_ppl, progress
        self.threads = torch.get_num_threads()
        self.made = 0  # folders made under tmp

    def folder(self, name: str) -> Path:
        self.made += 1
        return self.tmp / f"{self.made}-{name}"

    @functools.cached_property
    def fp32_graph(self) -> tuple[Path, LoadedModel, float]:
        start = time.perf_counter()
        path = write_fp32_graph(self.loaded.model, self.folder(FP32))
        return path, onnx_model(self.loaded, path, self.threads), time.perf_counter() - start

    def fp32(self) -> OnnxMade:
        path, model, seconds = self.fp32_graph
        return model, None, path, seconds

    def exported(self, recipe: Recipe, quantized: QuantizedModel | None) -> OnnxMade:
        """The recipe's model (applied again when its own row came from the cache) exported and loaded back; the
        seconds are the export's."""
        if quantized is None:
            quantized = apply_recipe(self.loaded, recipe, self.stream, ctx=self.plan.ctx, copy=True)
        start = time.perf_counter()
        try:
            folder = export(quantized, self.folder("export"), format="onnx")
        except SinkquantError as exc:
            raise _Refused(str(exc).strip().splitlines()[0]) from None
        model, prefix, _ = load_onnx(folder, threads=self.threads)
        return model, prefix, folder / MODEL_FILE, time.perf_counter() - start

    def peer(self, method: str) -> OnnxMade:
        """ONNX Runtime's `method` on the fp32 graph, static ones calibrated on the plan's calibration windows."""
        fp32, fp32_model, _ = self.fp32_graph
        calibration = [self.stream.windows(self.plan.ctx, [i]) for i in self.plan.calib_windows]
        start = time.perf_counter()
        path = quantize_peer(method, fp32, self.folder(method), calibration, fp32_model.model)
        return onnx_model(self.loaded, path, self.threads), None, path, time.perf_counter() - start

    def row(self, name: str, description: str, make: Callable[[], OnnxMade], bos: str,
            prefix_tokens: list[str] | None) -> Row:
        """The row of the model `make` builds; an exporter refusal is a refused row, any other error a failed one."""
        try:
            model, prefix, graph, seconds = make()
            result = evaluate(model, self.stream, self.plan, bos=bos, prefix=prefix, progress=self.progress,
                              desc=name)
        except _Refused as exc:
            return Row(recipe=name, description=description, status="refused", error=str(exc), runtime=ONNX_RUNTIME)
        except Exception as exc:  # one broken row must not sink the comparison
            return Row(recipe=name, description=description, status="failed", error=_failure(exc),
                       runtime=ONNX_RUNTIME)
        return Row(recipe=name, description=description, status="ok", ppl=result.ppl,
                   delta_pct=100 * (result.ppl / self.base_ppl - 1), quantize_seconds=seconds,
                   eval_seconds=result.seconds, prefix=prefix_tokens, weight_bytes=graph_bytes(graph),
                   tokens_per_s=result.tokens / result.seconds, runtime=ONNX_RUNTIME)


HEADERS = ["recipe", "status", "perplexity", "delta vs fp32", "weights MB", "tokens/s", "quantize s", "eval s",
           "prefix"]


def table_rows(comparison: dict[str, Any]) -> list[list[str]]:
    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    return [
        [r["recipe"], r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}", fmt(r["ppl"], "{:.3f}"),
         fmt(r["delta_pct"], "{:+.1f}%"), fmt(r.get("weight_bytes") and r["weight_bytes"] / 1e6, "{:.1f}"),
         fmt(r.get("tokens_per_s"), "{:.0f}"), fmt(r["quantize_seconds"], "{:.1f}"), fmt(r["eval_seconds"], "{:.1f}"),
         " ".join(repr(t) for t in r["prefix"]) if r["prefix"] else "-"]
        for r in comparison["rows"]
    ]


def plot(comparison: dict[str, Any]) -> bytes:
    """Perplexity per recipe against the fp32 line; log scale when a naive recipe explodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in comparison["rows"] if r["status"] == "ok" and r["recipe"] != FP32]
    base = next(r["ppl"] for r in comparison["rows"] if r["recipe"] == FP32)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.8))
    names = [r["recipe"] for r in ok]
    values = [r["ppl"] for r in ok]
    ax.barh(names, values, color=["tab:red" if v > 1.5 * base else "tab:blue" for v in values])
    ax.axvline(base, color="black", linestyle="--", label=f"fp32 {base:.2f}")
    if values and max(values) / base > 10:
        ax.set_xscale("log")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f} ({100 * (v / base - 1):+.1f}%)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better)")
    settings = comparison["settings"]
    ax.set_title(f"{comparison['model']['spec']}: ctx {settings['ctx']}, {len(settings['windows'])} windows")
    ax.legend(loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_comparison(comparison: dict[str, Any], out: str | Path) -> list[Path]:
    """compare.md, compare.json, compare.csv and compare.png, each written atomically."""
    out = Path(out)
    rows = table_rows(comparison)
    md = f"# Recipe comparison\n\n{markdown_table(HEADERS, rows)}\n![comparison](compare.png)\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(HEADERS)
    writer.writerows(rows)
    paths = [atomic_write_text(out / "compare.md", md), atomic_write_json(out / "compare.json", comparison),
             atomic_write_text(out / "compare.csv", buffer.getvalue())]
    if any(r["status"] == "ok" and r["recipe"] != FP32 and math.isfinite(r["ppl"]) for r in comparison["rows"]):
        paths.append(atomic_write_bytes(out / "compare.png", plot(comparison)))
    return paths
