"""`sinkquant` command line: a thin wrapper over the public API; every user error is one line, exit 2.

Building the parser imports no heavy library: each subcommand imports torch, transformers and the rest inside
its own `run`, after the Ctrl-C handling and the upstream-warning filters are in place. A subcommand's `check`
runs first, before torch is imported: every refusal that needs no model (recipe, flags, output folder, data file)
comes in well under a second."""

from __future__ import annotations

import argparse
import sys

from sinkquant.cli import check, compare, convert, export, harness, profile, quantize
from sinkquant.cli import eval as eval_command
from sinkquant.cli.noise import quiet_libraries
from sinkquant.errors import SinkquantError

COMMANDS = (eval_command, convert, profile, quantize, compare, check, export, harness)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line naming the command, no usage dump; exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sinkquant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # from the first instruction: Ctrl-C while torch is still importing is one line too
        args = build_parser().parse_args(argv)
        quiet_libraries(args.quiet)
        if getattr(args, "check", None) is not None:  # refusals that need no model: before torch is imported
            args.check(args)
        import torch

        torch.manual_seed(0)
        args.func(args)
    except SinkquantError as exc:
        print(f"sinkquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sinkquant: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a refused flag (2), as a return value for callers
        return exc.code if isinstance(exc.code, int) else 2
    return 0
