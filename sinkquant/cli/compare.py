"""`sinkquant compare`: perplexity of several recipes side by side against one fp32 baseline."""

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
    check_auto_args,
    check_data_args,
    max_windows,
)
from sinkquant.cli.auto import auto_recipe_file
from sinkquant.cli.loading import load_inputs
from sinkquant.cli.notes import bos_override
from sinkquant.errors import SinkquantError


def check(args: argparse.Namespace) -> None:
    """Before torch: every recipe file, the auto flags (refused when no recipe is auto), --onnx-peers, the data
    file."""
    from sinkquant.recipe import check_recipe_file

    check_auto_args(args, any(str(r) == AUTO for r in args.recipes))
    args.onnx_peers = onnx_peer_names(args.onnx_peers)
    calib = [args.calib_windows or (AUTO_CALIB_WINDOWS if str(r) == AUTO else check_recipe_file(r).calibration.windows)
             for r in args.recipes]
    check_data_args(args, max([1, *calib]) + 1)  # the most calibration any recipe takes, one evaluation window


def onnx_peer_names(text: str) -> list[str]:
    """--onnx-peers as a list of ONNX Runtime quantizations; an unknown or repeated name is refused in one line."""
    from sinkquant.backends import ONNX_PEERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    for index, name in enumerate(names):
        if name not in ONNX_PEERS:
            raise SinkquantError(f"--onnx-peers: {name!r} is not valid; valid: {', '.join(ONNX_PEERS)} "
                                 "(comma-separated)")
        if name in names[:index]:
            raise SinkquantError(f"--onnx-peers: {name!r} is given twice")
    return names


def run(args: argparse.Namespace) -> None:
    from sinkquant.comparison import HEADERS, compare, table_rows, write_comparison
    from sinkquant.tables import print_table

    loaded, stream = load_inputs(args)
    cache = args.cache or args.out / "cache"
    recipes = [auto_recipe_file(args, loaded, stream, args.out) if str(r) == AUTO else r for r in args.recipes]
    comparison = compare(loaded, recipes, stream, ctx=args.ctx, max_windows=max_windows(args), bos=args.bos,
                         cache_dir=cache, progress=not args.quiet, calib_windows=args.calib_windows,
                         onnx=args.onnx, onnx_peers=args.onnx_peers)
    comparison["overrides"] = [o for row in comparison["rows"] if row.get("prefix") and row["runtime"] == "torch"
                               if (o := bos_override("compare", row["recipe"], row["prefix"], args.bos))]
    comparison["run"] = {"device": args.device, "dtype": args.dtype}
    paths = write_comparison(comparison, args.out)
    print_table(f"{loaded.spec}: ctx {args.ctx}, {len(comparison['settings']['windows'])} windows", HEADERS,
                table_rows(comparison))
    print("wrote " + ", ".join(str(p) for p in paths))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="perplexity of several recipes side by side against fp32")
    p.add_argument("--recipes", nargs="+", required=True,
                   help="recipe files, e.g. recipes/*.yaml; 'auto' searches one for this model (see --scheme)")
    add_auto_args(p)
    add_model_args(p)
    add_data_args(p, calib_windows=0, calib_help="calibration windows from the end of the text, for every recipe "
                                                 "and the auto search (default: each recipe's calibration.windows)")
    add_output_args(p)
    p.add_argument("--out", type=Path, default=Path("out/compare"), help="folder for compare.md/.json/.csv/.png")
    p.add_argument("--cache", type=Path, default=None, help="result cache (default OUT/cache); re-runs skip "
                                                             "finished recipes")
    p.add_argument("--onnx", action="store_true",
                   help="also export fp32 and every recipe to ONNX and evaluate each through ONNX Runtime on the "
                        "same windows, as rows of their own ('<recipe> (ONNX Runtime)'); a recipe the exporter "
                        "refuses is a row with the reason")
    p.add_argument("--onnx-peers", default="",
                   help="add ONNX Runtime's own int8 quantization of the fp32 ONNX graph as peer rows, "
                        "comma-separated: minmax, percentile, entropy (quantize_static, calibrated on the recipes' "
                        "calibration windows) and dynamic (quantize_dynamic)")
    p.set_defaults(func=run, check=check)
