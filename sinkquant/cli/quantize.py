"""`sinkquant quantize`: apply a recipe file to a model, evaluate it, write a self-contained artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import (
    AUTO,
    AUTO_CALIB_WINDOWS,
    add_auto_args,
    add_data_args,
    add_model_args,
    add_output_args,
    add_stream_arg,
    check_auto_args,
    check_data_args,
    max_windows,
)
from sinkquant.cli.auto import auto_recipe_file
from sinkquant.cli.loading import load_kwargs, token_stream
from sinkquant.cli.notes import bos_override


def check(args: argparse.Namespace) -> None:
    """Every refusal that needs no model, before torch is imported: the recipe (or the auto flags), flags that
    would do nothing, the output folder, the data file."""
    from sinkquant.io import check_output_dir
    from sinkquant.recipe import check_recipe_file

    auto = str(args.recipe) == AUTO
    check_auto_args(args, auto)
    windows = (args.calib_windows or AUTO_CALIB_WINDOWS) if auto else \
        (args.calib_windows or check_recipe_file(args.recipe).calibration.windows)
    check_output_dir(args.out, args.overwrite, reads=(args.model,))
    check_data_args(args, windows + 1)  # calibration windows plus one evaluation window


def run(args: argparse.Namespace) -> None:
    import tempfile

    from sinkquant.data import plan_windows
    from sinkquant.engine import apply_recipe, save
    from sinkquant.models import load_model, load_tokenizer
    from sinkquant.recipe import load_recipe
    from sinkquant.search.targets import TARGETS
    from sinkquant.tables import print_table

    auto = str(args.recipe) == AUTO
    if auto:
        refuse_auto_at_scale(args)
    else:
        recipe = load_recipe(args.recipe).with_calib_windows(args.calib_windows)
    stream = token_stream(args, load_tokenizer(args.model, args.trust_remote_code))  # before any weight is read
    if not auto and run_streaming(args, recipe, stream):
        return
    loaded = load_model(args.model, **load_kwargs(args))
    attachments = None
    if auto:  # the searched recipe and its trace go into the artifact (listed and verified), nowhere else
        with tempfile.TemporaryDirectory(prefix="sinkquant-auto-") as tmp:
            recipe = load_recipe(auto_recipe_file(args, loaded, stream, tmp, shown=args.out))
            attachments = {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir())}
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=recipe.calibration.windows)
    quantized = apply_recipe(loaded, recipe, stream, ctx=args.ctx)
    overrides = []
    if quantized.prefix is not None and (bos := bos_override("quantize", recipe.name, quantized.prefix_tokens,
                                                             args.bos)):
        overrides.append(bos)
    result = quantized.evaluate(stream, plan, bos=args.bos, progress=not args.quiet)
    export_format = TARGETS[args.target].export_format if auto else None
    if export_format is not None:  # --target compressed-tensors / onnx: that runtime's folder is the artifact
        from sinkquant.backends.export import export

        export(quantized, args.out, format=export_format, overwrite=args.overwrite)
    else:
        save(quantized, args.out, overwrite=args.overwrite, attachments=attachments,
             extra={"perplexity": result.to_dict(), "overrides": overrides,
                    "run": {"device": args.device, "dtype": args.dtype, "calib_windows": recipe.calibration.windows}})
    print_table(
        f"{recipe.name} on {loaded.spec}",
        ["recipe", "backend", "prefix", "ctx", "windows", "perplexity", "quantize s", "eval s"],
        [[recipe.name, recipe.backend, quantized.prefix_tokens or "-", result.ctx, result.windows, f"{result.ppl:.4f}",
          f"{quantized.record['seconds']:.1f}", f"{result.seconds:.1f}"]],
    )
    print(f"wrote {args.out}" + (f" ({export_format} export; the perplexity above is the native backend's, the "
                                 f"same integers: sinkquant eval --model {args.out} runs the export itself)"
                                 if export_format else ""))


def refuse_auto_at_scale(args: argparse.Namespace) -> None:
    """--recipe auto compares whole candidate models in memory: it runs up to the size that fits (in-memory peak
    1.3x the weights) and refuses a larger model, or --stream always, before loading it."""
    import torch

    from sinkquant.engine.stream import memory_shortfall
    from sinkquant.errors import SinkquantError

    shortfall = memory_shortfall(args.model, getattr(torch, args.dtype))
    if args.stream == "always" or shortfall:
        raise SinkquantError(f"--recipe auto runs in memory (its candidates are whole-model comparisons) and cannot "
                             f"stream{': ' + shortfall if shortfall else ''}; quantize this model with a recipe "
                             "file (the fixed recipes stream)")


def run_streaming(args: argparse.Namespace, recipe, stream) -> bool:
    """Quantize layer by layer from disk (engine/stream.py) when `--stream` asks for it or, by default, when the
    model would not fit in memory; then evaluate the artifact the same way. False: quantize in memory."""
    import torch

    from sinkquant.cli.loading import stream_reason, streamed_embeddings
    from sinkquant.data import plan_windows
    from sinkquant.engine.artifact import load
    from sinkquant.engine.stream import quantize_streaming
    from sinkquant.tables import print_table

    reason = stream_reason(args, recipe)
    if reason is None:
        return False
    print(f"streaming {args.model} one decoder layer at a time ({reason})")
    dtype, embeddings = getattr(torch, args.dtype), streamed_embeddings(args)
    quantized = quantize_streaming(
        args.model, recipe, stream, ctx=args.ctx, out=args.out, dtype=dtype, embeddings_dtype=embeddings,
        overwrite=args.overwrite, progress=not args.quiet,
        extra={"run": {"device": "cpu", "dtype": args.dtype, "calib_windows": recipe.calibration.windows,
                       "stream": reason, "embeddings_dtype": str(embeddings) if embeddings else None}})
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=recipe.calibration.windows)
    result = load(args.out, stream=True).evaluate(stream, plan, bos=args.bos, progress=not args.quiet)
    print_table(
        f"{recipe.name} on {args.model} (streamed)",
        ["recipe", "prefix", "ctx", "windows", "perplexity", "quantize s", "layer reads", "eval s"],
        [[recipe.name, quantized.prefix_tokens or "-", result.ctx, result.windows, f"{result.ppl:.4f}",
          f"{quantized.record['seconds']:.1f}", quantized.record["stream"]["layer_reads"], f"{result.seconds:.1f}"]],
    )
    print(f"wrote {args.out} (perplexity measured after writing, by streaming the artifact back)")
    return True


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model by a recipe and write a reloadable artifact")
    p.add_argument("--recipe", type=Path, required=True,
                   help="a YAML recipe (e.g. recipes/w8a8-prefix-smooth-except.yaml), or 'auto': search one for this "
                        "model on calibration windows (see --scheme)")
    add_auto_args(p)
    add_model_args(p)
    add_data_args(p, calib_windows=0,
                  calib_help="calibration windows from the end of the text (default: the recipe's calibration.windows)")
    add_output_args(p)
    p.add_argument("--out", type=Path, required=True, help="artifact folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_stream_arg(p, ", writing the artifact as it goes")
    p.set_defaults(func=run, check=check)
