"""`sinkquant check`: perplexity regression check against baseline files, for any CI. Every file is checked and
reported; the exit status is 2 if any drifted or could not be checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sinkquant.cli.args import add_output_args
from sinkquant.errors import SinkquantError


def check(args: argparse.Namespace) -> None:
    """Before torch: every baseline file and its recipe are read and validated; a bad one is reported at once (and
    fails the run at the end), the others are measured by `run`."""
    from sinkquant.recipe import check_recipe_file
    from sinkquant.regression import read_baseline, recipe_path

    args.refused = []
    for path in args.baselines:
        try:
            check_recipe_file(recipe_path(path, read_baseline(path)))
        except SinkquantError as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            args.refused.append(path)
    if len(args.refused) == len(args.baselines):
        _fail(args.refused, args.baselines)


def _fail(failed: list[Path], baselines: list[Path]) -> None:
    raise SinkquantError(f"{len(failed)} of {len(baselines)} baseline(s) failed: " + ", ".join(str(p) for p in failed))


def run(args: argparse.Namespace) -> None:
    from sinkquant.regression import check_baseline

    failed = list(args.refused)
    for path in args.baselines:
        if path in args.refused:
            continue
        try:
            outcome = check_baseline(path, update=args.update_baselines, progress=not args.quiet)
        except SinkquantError as exc:
            print(f"{path}: error: {exc}", file=sys.stderr)
            failed.append(path)
            continue
        print(outcome.message, flush=True)
        if not outcome.passed:
            failed.append(path)
    if failed:
        _fail(sorted(failed, key=args.baselines.index), args.baselines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="perplexity regression check against baseline files (for CI)")
    p.add_argument("baselines", nargs="+", type=Path, help="baseline files, e.g. eval/baselines/*.json")
    p.add_argument("--update-baselines", action="store_true",
                   help="re-measure on every CPU kernel path this machine runs and rewrite the baselines")
    add_output_args(p)
    p.set_defaults(func=run, check=check)
