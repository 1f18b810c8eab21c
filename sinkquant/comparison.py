"""Side-by-side perplexity of several recipes on the same windows with one shared fp32 baseline.

Each finished row is cached under (model hash, recipe hash, data hash, settings, sinkquant's version and the
hash of its code), so a re-run skips finished work, an interrupted run resumes, and rows of older code are never
reused; a recipe that fails is a row with its error, the others still run. A cache row that cannot be read is
recomputed, with one warning line."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import traceback
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine import apply_recipe
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
from sinkquant.perplexity import evaluate
from sinkquant.recipe import load_recipe
from sinkquant.tables import markdown_table

log = logging.getLogger(__name__)
FP32 = "fp32"


@dataclass
class Row:
    recipe: str
    description: str
    status: str  # "ok" | "failed"
    ppl: float | None = None
    delta_pct: float | None = None
    quantize_seconds: float | None = None
    eval_seconds: float | None = None
    prefix: list[str] | None = None
    weight_bytes: int | None = None  # what the artifact stores (integers + scales + the rest); peers: None
    tokens_per_s: float | None = None  # scored tokens per second of evaluation (simulated layers are slower)
    error: str | None = None
    cached: bool = False


# The type each cached field must have: a row edited or truncated on disk is recomputed, not shown.
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (str,), "description": (str,), "status": (str,), "ppl": (float, int), "delta_pct": (float, int),
    "quantize_seconds": (float, int), "eval_seconds": (float, int), "prefix": (list,), "weight_bytes": (int,),
    "tokens_per_s": (float, int), "error": (str,),
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
    if data["status"] not in ("ok", "failed") or (data["status"] == "ok" and data.get("ppl") is None):
        raise ValueError(f"status {data['status']!r} with ppl {data.get('ppl')!r}")
    return Row(**{**data, "cached": True})


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
) -> dict[str, Any]:
    """Evaluate fp32 and every recipe on the same evaluation windows; returns the comparison as a dict.
    `calib_windows` replaces every recipe's `calibration.windows` (as `quantize --calib-windows` does)."""

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
        if cache is not None and row.status == "ok":
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
    for path, recipe, error in recipes:
        if recipe is None:
            rows.append(Row(recipe=Path(path).stem, description="", status="failed", error=error))
            continue
        key = _cache_key(loaded, recipe.resolved(), stream, settings)
        row = cached_row(key)
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
                last = traceback.extract_tb(exc.__traceback__)[-1]
                row = Row(recipe=recipe.name, description=recipe.description, status="failed",
                          error=f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})")
            store(key, row)
        rows.append(row)
    return {
        "model": {"spec": loaded.spec, **loaded.source},
        "data": {"sha256": stream.text_sha256, **stream.source, **plan.describe()},
        "settings": settings,
        "versions": library_versions(),
        "code_sha256": code_sha256(),
        "rows": [asdict(r) for r in rows],
    }


HEADERS = ["recipe", "status", "perplexity", "delta vs fp32", "weights MB", "tokens/s", "quantize s", "eval s",
           "prefix"]


def table_rows(comparison: dict[str, Any]) -> list[list[str]]:
    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    return [
        [r["recipe"], r["status"] if r["status"] == "ok" else f"failed: {r['error']}", fmt(r["ppl"], "{:.3f}"),
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
