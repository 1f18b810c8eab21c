"""`sinkquant lm-eval ...`: lm-evaluation-harness's own command line with the `sinkquant` model type registered
(lm-eval has no plugin discovery: the registration is an import). Every argument goes to lm-eval unchanged;
`--model sinkquant` and `--device cpu` are added when not given."""

from __future__ import annotations

import argparse
import sys

from sinkquant.errors import SinkquantError


def run(args: argparse.Namespace) -> None:
    from lm_eval.__main__ import cli_evaluate

    import sinkquant.harness  # noqa: F401  registers the model type

    rest = list(args.lm_eval_args)
    given = {a.split("=")[0] for a in rest if a.startswith("--")}
    if "--model" not in given:
        rest = ["--model", sinkquant.harness.NAME, *rest]
    if "--device" not in given:  # lm-eval's own default is cuda:0; artifacts run on the CPU
        rest = ["--device", "cpu", *rest]
    if not rest or rest[0].startswith("-"):
        rest = ["run", *rest]
    argv = sys.argv
    sys.argv = ["lm-eval", *rest]
    try:
        cli_evaluate()
    except ValueError as exc:  # lm-eval's word for a bad task or argument
        raise SinkquantError(f"lm-eval: {exc}") from None
    finally:
        sys.argv = argv


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="lm-evaluation-harness on a sinkquant artifact: `sinkquant lm-eval --model_args artifact=DIR "
             "--tasks ...` (every argument is lm-eval's; see `sinkquant lm-eval --help`)")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=run, quiet=False)
