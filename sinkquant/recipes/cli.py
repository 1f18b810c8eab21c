"""`sinkquant quantize`: apply a recipe file to a model, evaluate it, write a self-contained artifact."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.artifacts import check_output_dir
from sinkquant.cli import add_data_args, add_model_args, add_output_args, load_inputs, max_windows


def cmd_quantize(args: argparse.Namespace) -> None:
    from sinkquant.data import plan_windows
    from sinkquant.engine import apply_recipe, save
    from sinkquant.recipes import load_recipe
    from sinkquant.tables import print_table

    recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    check_output_dir(args.out, args.overwrite)
    loaded, stream = load_inputs(args)
    quantized = apply_recipe(loaded, recipe, stream, ctx=args.ctx)
    plan = plan_windows(stream, args.ctx, max_windows(args), calib_windows=recipe.calibration.windows)
    result = quantized.evaluate(stream, plan, bos=args.bos, progress=not args.quiet)
    save(quantized, args.out, extra={"perplexity": result.to_dict()}, overwrite=args.overwrite)
    prefix = {"tokens": quantized.prefix_tokens}
    print_table(
        f"{recipe.name} on {loaded.spec}",
        ["recipe", "backend", "prefix", "ctx", "windows", "perplexity", "quantize s", "eval s"],
        [[recipe.name, recipe.backend, prefix["tokens"] or "-", result.ctx, result.windows, f"{result.ppl:.4f}",
          f"{quantized.record['seconds']:.1f}", f"{result.seconds:.1f}"]],
    )
    print(f"wrote {args.out}")


def cmd_compare(args: argparse.Namespace) -> None:
    from sinkquant.compare import HEADERS, compare, table_rows, write_comparison
    from sinkquant.tables import print_table

    loaded, stream = load_inputs(args)
    cache = args.cache or args.out / "cache"
    comparison = compare(loaded, args.recipes, stream, ctx=args.ctx, max_windows=max_windows(args), bos=args.bos,
                         cache_dir=cache, progress=not args.quiet)
    paths = write_comparison(comparison, args.out)
    print_table(f"{loaded.spec}: ctx {args.ctx}, {len(comparison['settings']['windows'])} windows", HEADERS,
                table_rows(comparison))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_check(args: argparse.Namespace) -> None:
    from sinkquant.errors import SinkquantError
    from sinkquant.regression import check_baseline

    failed = 0
    for path in args.baselines:
        outcome = check_baseline(path, update=args.update_baselines, progress=not args.quiet)
        print(outcome.message)
        failed += not outcome.passed
    if failed:
        raise SinkquantError(f"{failed} of {len(args.baselines)} baseline(s) drifted beyond tolerance")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model by a recipe and write a reloadable artifact")
    p.add_argument("--recipe", type=Path, required=True, help="a YAML recipe, e.g. recipes/w8a8-prefix-clip.yaml")
    add_model_args(p)
    add_data_args(p)
    add_output_args(p)
    p.add_argument("--out", type=Path, required=True, help="artifact folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_quantize)

    p = subparsers.add_parser("compare", help="perplexity of several recipes side by side against fp32")
    p.add_argument("--recipes", nargs="+", required=True, help="recipe files, e.g. recipes/*.yaml")
    add_model_args(p)
    add_data_args(p)
    add_output_args(p)
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="folder for compare.md/.json/.csv/.png")
    p.add_argument("--cache", type=Path, default=None, help="result cache (default OUT/cache); re-runs skip "
                                                             "finished recipes")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("check", help="perplexity regression check against baseline files (for CI)")
    p.add_argument("baselines", nargs="+", type=Path, help="baseline files, e.g. eval/baselines/*.json")
    p.add_argument("--update-baselines", action="store_true", help="re-measure and rewrite the baselines")
    add_output_args(p)
    p.set_defaults(func=cmd_check)
