"""`sinkquant` command line: a thin wrapper over the public API; every user error is one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sinkquant.errors import SinkquantError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="'smollm2-135m' (embedded), a .gguf file, a safetensors folder or a hub id")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def add_data_args(parser: argparse.ArgumentParser, ctx: int = 512, max_windows: int | None = 16,
                  eval_windows: bool = True) -> None:
    parser.add_argument("--data", default="wikitext2",
                        help="'wikitext2', a .txt/.raw/.jsonl/.parquet file, or a hub data set name")
    parser.add_argument("--data-config", default=None, help="hub data set config (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--data-split", default="test", help="hub data set split")
    parser.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/hub rows")
    parser.add_argument("--local-copy", default=None,
                        help="local copy of WikiText-2 test (wiki.test.raw) when the hub is out of reach; "
                             "or set SINKQUANT_WIKITEXT2")
    parser.add_argument("--ctx", type=int, default=ctx, help="window length in tokens")
    if eval_windows:
        parser.add_argument("--max-windows", type=int, default=max_windows,
                            help="evaluate at most this many windows (0 = all)")
    parser.add_argument("--bos", default="auto", choices=["never", "per-window", "auto"],
                        help="BOS in front of each window; auto = the tokenizer's own convention")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def max_windows(args: argparse.Namespace) -> int | None:
    return None if not args.max_windows else args.max_windows


def load_inputs(args: argparse.Namespace):
    """Model and token stream from the common flags."""
    from sinkquant.data import load_text, tokenize
    from sinkquant.models import load_model

    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code)
    text = load_text(args.data, config=args.data_config, split=args.data_split, text_field=args.text_field,
                     local_copy=args.local_copy)
    return loaded, tokenize(text, loaded.tokenizer)


def cmd_eval(args: argparse.Namespace) -> None:
    from sinkquant.artifacts import atomic_write_json
    from sinkquant.data import plan_windows
    from sinkquant.perplexity import evaluate
    from sinkquant.tables import print_table

    loaded, stream = load_inputs(args)
    plan = plan_windows(stream, args.ctx, max_windows(args))
    result = evaluate(loaded, stream, plan, bos=args.bos, progress=not args.quiet, batch_size=args.batch_size)
    print_table(
        f"{loaded.spec} on {stream.source.get('path', stream.source.get('name'))}",
        ["ctx", "windows", "BOS", "tokens", "perplexity", "word ppl", "bits/byte", "seconds"],
        [[result.ctx, result.windows, result.bos, result.tokens, f"{result.ppl:.4f}",
          f"{result.word_perplexity:.4f}", f"{result.bits_per_byte:.4f}", f"{result.seconds:.1f}"]],
    )
    if args.out:
        atomic_write_json(args.out, result.to_dict())
        print(f"wrote {args.out}")


def cmd_convert(args: argparse.Namespace) -> None:
    from sinkquant.models import convert

    out = convert(args.model, args.out, overwrite=args.overwrite)
    print(f"wrote safetensors model to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinkquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    add_model_args(p)
    add_data_args(p)
    add_output_args(p)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", help="write a model (GGUF included) as a safetensors folder")
    add_model_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    # Each job's module adds its own subcommand; imported here, after this module is complete.
    from sinkquant.profiling.cli import register as register_profile
    from sinkquant.recipes.cli import register as register_recipes

    register_profile(sub)
    register_recipes(sub)
    return parser


def _quiet_libraries(quiet: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    logging.getLogger("torchao").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _quiet_libraries(getattr(args, "quiet", False))
        import torch

        torch.manual_seed(0)
        args.func(args)
    except SinkquantError as exc:
        print(f"sinkquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sinkquant {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
