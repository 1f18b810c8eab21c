"""Rotated recipes through compressed-tensors: the native backend's perplexity against the export loaded back by
transformers + compressed-tensors (its transform_config's online transforms attached, as vLLM does, and its fp
prefix KV from the sidecar), same windows (issue 29: within 0.3%); recipes the format cannot express are listed
with the reason the exporter gives.

    python eval/bench_ct_transforms.py --model smollm2-135m --recipes recipes/w4a16-gptq.yaml \\
        eval/results/auto-w8a8-static.yaml

Each recipe runs with backend native. Rounded activations make one float32 perplexity defined only up to float
rounding: beside each static-activation row stands the native model's float64 twin (the same integers and
scales in double precision), whose distance from float32 is the spread one run cannot resolve. And the two
grids differ at one end: sinkquant's symmetric int8 grid is [-127, 127], compressed-tensors' (and vLLM's int8
kernels') [-128, 127], so an activation beyond the calibrated range on the negative side is clamped one step
further in the export; the native model run on the export's grid (its clamp widened to -128, nothing else
changed) shows what that accounts for."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path

import benchlib
import yaml

import sinkquant.backends.native as native_backend
from sinkquant.backends.export import export
from sinkquant.backends.export.compressed_tensors import compressed_tensors_refusals, load_prefix_cache
from sinkquant.backends.registry import native_refusal
from sinkquant.data import plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.models import load_model
from sinkquant.perplexity import Prefix, evaluate
from sinkquant.recipe import parse_recipe
from sinkquant.tables import markdown_table

GOAL = 0.3  # percent


@contextlib.contextmanager
def export_grid() -> Iterator[None]:
    """The native backend's activation clamp on compressed-tensors' signed grid [-2^(b-1), 2^(b-1) - 1]."""
    original = native_backend.qrange
    native_backend.qrange = lambda bits, symmetric: (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric \
        else original(bits, symmetric)
    try:
        yield
    finally:
        native_backend.qrange = original


def main() -> None:
    p = benchlib.parser(__doc__, windows=8, out="eval/results/ct_transforms")
    p.add_argument("--recipes", nargs="+", type=Path, required=True)
    p.add_argument("--bos", default="never")
    args = p.parse_args()
    loaded, stream = benchlib.setup(args)
    rows, payload = [], {}
    for path in args.recipes:
        data = yaml.safe_load(path.read_text())
        recipe = parse_recipe(data, str(path))
        if native_refusal(recipe.scheme) is None:  # else it is refused below, by the export's reasons
            recipe = parse_recipe({**data, "backend": "native"}, str(path))
        name = f"{path.stem} ({path.parent.name})"
        refusals = compressed_tensors_refusals(recipe, loaded.model)
        if refusals:
            payload[name] = {"refused": refusals}
            rows.append([name, "-", "-", "-", "-", "-", "refused: " + "; ".join(refusals)])
            print(rows[-1], flush=True)
            continue
        plan = plan_windows(stream, args.ctx, max_windows=args.windows, calib_windows=recipe.calibration.windows)
        quantized = apply_recipe(loaded, recipe, stream, ctx=args.ctx, copy=True)
        native = quantized.evaluate(stream, plan, bos=args.bos, progress=False).ppl
        native64 = grid = None
        if recipe.scheme.activations is not None:
            with export_grid():
                grid = quantized.evaluate(stream, plan, bos=args.bos, progress=False).ppl
            native64 = evaluate(loaded, stream, plan, bos="never" if quantized.prefix else args.bos,
                                prefix=quantized.prefix, model=copy.deepcopy(quantized.model).double(),
                                progress=False).ppl
        with tempfile.TemporaryDirectory() as tmp:
            folder = export(quantized, Path(tmp) / "ct")
            transforms = yaml.safe_load((folder / "config.json").read_text())["quantization_config"][
                "transform_config"]
            reloaded = load_model(str(folder))
            prefix = Prefix(*load_prefix_cache(folder, reloaded.model.config)) if quantized.prefix else None
            exported = evaluate(reloaded, stream, plan, bos="never" if prefix else args.bos, prefix=prefix,
                                progress=False).ppl
        delta = 100 * (exported / native - 1)
        spread = None if native64 is None else 100 * (native64 / native - 1)
        on_grid = None if grid is None else 100 * (exported / grid - 1)
        kinds = {k: v["type"] for k, v in transforms.get("config_groups", {}).items()}
        payload[name] = {"native": native, "native_float64": native64, "native_on_export_grid": grid,
                         "reload_vs_native_on_export_grid_pct": on_grid, "compressed_tensors": exported,
                         "delta_pct": delta, "float64_spread_pct": spread, "transforms": kinds,
                         "prefix": quantized.prefix.ids if quantized.prefix else []}
        rows.append([name, f"{native:.4f}", f"{exported:.4f}", f"{delta:+.3f}%",
                     "-" if spread is None else f"{spread:+.3f}%",
                     "-" if grid is None else f"{grid:.4f} ({on_grid:+.3f}%)",
                     f"{'PASS' if abs(delta) <= GOAL else 'FAIL'}; transforms {kinds}"])
        print(rows[-1], flush=True)
    body = (f"{args.model}, WikiText-2 test, ctx {args.ctx}, first {args.windows} windows, --bos {args.bos} (a "
            "prefix recipe brings its own, from the export's sidecar); calibration on each recipe's windows from "
            f"the end of the text. Goal: the compressed-tensors export within {GOAL}% of the native backend.\n\n"
            + markdown_table(["recipe", "native", "compressed-tensors reload", "reload vs native",
                              "native float64 vs float32", "native on the export's grid (reload vs it)",
                              "result"], rows))
    benchlib.write_result(args.out, f"compressed-tensors with rotations: {args.model}", body,
                          {"rows": payload, "ctx": args.ctx, "windows": args.windows, "model": args.model})


if __name__ == "__main__":
    main()
