"""`sinkquant check`: perplexity regression check against baseline files, for any CI. Every file is checked and
reported; the exit status is 2 if any drifted or could not be checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sinkquant.cli.args import add_output_args
from sinkquant.errors import SinkquantError


def run(args: argparse.Namespace) -> None:
    from sinkquant.regression import check_baseline

    failed = []
    for path in args.baselines:
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
        raise SinkquantError(f"{len(failed)} of {len(args.baselines)} baseline(s) failed: "
                             + ", ".join(str(p) for p in failed))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="perplexity regression check against baseline files (for CI)")
    p.add_argument("baselines", nargs="+", type=Path, help="baseline files, e.g. eval/baselines/*.json")
    p.add_argument("--update-baselines", action="store_true",
                   help="re-measure on every CPU kernel path this machine runs and rewrite the baselines")
    add_output_args(p)
    p.set_defaults(func=run)
