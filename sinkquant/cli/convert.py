"""`sinkquant convert`: write any loadable model (GGUF included) as a safetensors folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import add_model_args, add_output_args
from sinkquant.cli.loading import load_kwargs


def check(args: argparse.Namespace) -> None:
    """Before torch: --out may be written, and is not the model folder being read."""
    from sinkquant.io import check_output_dir

    check_output_dir(args.out, args.overwrite, reads=(args.model,))


def run(args: argparse.Namespace) -> None:
    from sinkquant.io import atomic_dir
    from sinkquant.models import load_model

    # models.convert loads with its defaults; this command honours --dtype and --trust-remote-code.
    loaded = load_model(args.model, **load_kwargs(args))
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    print(f"wrote safetensors model ({args.dtype}) to {args.out}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="write a model (GGUF included) as a safetensors folder")
    add_model_args(p)
    add_output_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run, check=check)
