"""Flags every `sinkquant` subcommand shares and their checks, all before torch: parse-time number checks, the
`--recipe auto` flags, a local data file's fit.

Importing this module stays cheap (no torch, no transformers): `sinkquant --help` builds every parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sinkquant.errors import SinkquantError

DTYPES = ("float32", "bfloat16", "float16")


def bounded_int(low: int, what: str) -> Callable[[str], int]:
    """An argparse `type=` that refuses integers below `low` before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low} ({what})")
        return value

    return parse


ctx_type = bounded_int(2, "a window needs at least 2 tokens: one to condition on, one to score")
positive_int = bounded_int(1, "must be at least 1")
windows_type = bounded_int(0, "0 = all windows")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (embedded), a .gguf file, a safetensors folder or a hub id")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the model runs; auto = cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and activations dtype")


def add_stream_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """--stream, one meaning for every command: read the model one decoder layer at a time (docs/scale.md)."""
    parser.add_argument("--stream", default="auto", choices=["auto", "always", "never"],
                        help=f"read the model one decoder layer at a time from its safetensors folder{what} "
                             "(docs/scale.md): auto (default) when it would not fit in memory, always, or never")


def add_data_args(parser: argparse.ArgumentParser, ctx: int = 512, max_windows: int | None = 16,
                  calib_windows: int | None = None, calib_help: str = "", several: bool = False) -> None:
    """Text flags; `max_windows=None` leaves out --max-windows (evaluation windows), `calib_windows` adds
    --calib-windows (calibration windows) with that default (0 = the recipe's own); `several` lets --data repeat,
    each text named NAME=SPEC."""
    if several:
        parser.add_argument("--data", action="append", default=None,
                            help="a text, repeatable, each NAME=SPEC or SPEC (SPEC: 'wikitext2', a "
                                 ".txt/.raw/.jsonl/.parquet file, or a hub data set); default wikitext2")
    else:
        parser.add_argument("--data", default="wikitext2",
                            help="'wikitext2', a .txt/.raw/.jsonl/.parquet file, or a hub data set name")
    parser.add_argument("--data-config", default=None, help="hub data set config (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--data-split", default="test", help="hub data set split")
    parser.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/hub rows")
    parser.add_argument("--local-copy", default=None,
                        help="local copy of WikiText-2 test (wiki.test.raw) when the hub is out of reach; "
                             "or set SINKQUANT_WIKITEXT2")
    parser.add_argument("--ctx", type=ctx_type, default=ctx, help="window length in tokens (>= 2)")
    if max_windows is not None:
        parser.add_argument("--max-windows", type=windows_type, default=max_windows,
                            help="evaluation windows, from the start of the text (0 = all)")
    if calib_windows is not None:
        parser.add_argument("--calib-windows", type=positive_int, default=calib_windows or None,
                            help=calib_help or "calibration windows, from the end of the text")
    parser.add_argument("--bos", default="auto", choices=["never", "per-window", "auto"],
                        help="BOS in front of each window; auto = the tokenizer's own convention")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def max_windows(args: argparse.Namespace) -> int | None:
    return args.max_windows or None


AUTO = "auto"
AUTO_CALIB_WINDOWS = 8  # --recipe auto's calibration windows when --calib-windows is not given


def add_auto_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheme", default=None,
                        help="base scheme searched by --recipe auto: w8a8-static (default), w4a8kv8 or w4a4kv4")
    parser.add_argument("--budget", type=float, default=None,
                        help="--recipe auto: error budget (mean KL to fp32, nats per token): the fewest exception "
                             "layers that meet it; later stages are skipped once it is met")
    parser.add_argument("--max-exceptions", type=int, default=None,
                        help="--recipe auto: the most Linear inputs it may keep in full precision while the budget "
                             "is unmet (default 32; 0: none); each one runs its GEMM on float activations")
    parser.add_argument("--target", default=None,
                        help="--recipe auto: the runtime the result must run on; the search tries only what it "
                             "executes: native (default: sinkquant's int8 kernels, a native artifact), "
                             "compressed-tensors (vLLM), onnx (ONNX Runtime) or simulated (research, any scheme)")


AUTO_FLAGS = ("scheme", "budget", "max_exceptions", "target")  # what only `--recipe auto` reads


def check_auto_args(args: argparse.Namespace, auto: bool = True) -> None:
    """Before torch: --scheme, --budget, --max-exceptions and --calib-windows of `--recipe auto` (their defaults
    filled in); without `auto` (recipe files only) any of the first three given is refused, since it would do
    nothing."""
    from sinkquant.search.space import (
        DEFAULT_BUDGET,
        DEFAULT_MAX_EXCEPTIONS,
        base_scheme,
        check_budget,
        check_calib_windows,
        check_max_exceptions,
    )

    if not auto:
        given = next((f for f in AUTO_FLAGS if getattr(args, f) is not None), None)
        if given is not None:
            raise SinkquantError(f"--{given.replace('_', '-')} only applies to --recipe auto; a recipe file sets "
                                 "its own scheme and steps: leave the flag out")
        return
    from sinkquant.search.targets import DEFAULT_TARGET, check_target

    args.scheme = args.scheme or "w8a8-static"
    base_scheme(args.scheme)
    args.target = args.target or DEFAULT_TARGET
    check_target(args.target, args.scheme)
    args.budget = check_budget(DEFAULT_BUDGET if args.budget is None else args.budget)
    args.max_exceptions = check_max_exceptions(DEFAULT_MAX_EXCEPTIONS if args.max_exceptions is None
                                               else args.max_exceptions)
    if getattr(args, "calib_windows", None):
        check_calib_windows(args.calib_windows)


def check_data_args(args: argparse.Namespace, windows: int = 1) -> None:
    """Before torch: a local --data file's format, and whether it can hold `windows` windows of --ctx tokens
    (sinkquant.data.check_data_file); a hub data set is checked when it loads."""
    from sinkquant.data import check_data_file, local_data_path

    args.data_windows = windows  # cli.loading.token_stream checks the same count in tokens, before the model loads
    path = local_data_path(args.data, args.local_copy)
    if path is not None:
        check_data_file(path, args.text_field, args.ctx, windows)
