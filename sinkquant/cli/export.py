"""`sinkquant export`: an artifact written by `sinkquant quantize`, in a format serving engines load."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import add_output_args


def check(args: argparse.Namespace) -> None:
    """Before torch: the format is one, the artifact is one, and --out may be written (never the artifact or a
    folder holding it)."""
    from sinkquant.backends import FORMATS
    from sinkquant.errors import SinkquantError
    from sinkquant.io import ARTIFACT_MANIFEST, check_output_dir, read_manifest

    if args.format not in FORMATS:
        raise SinkquantError(f"--format {args.format!r} is not valid; valid: {', '.join(FORMATS)}")

    read_manifest(args.artifact, ARTIFACT_MANIFEST, "it is not a sinkquant artifact; write one with `sinkquant "
                  "quantize`")
    check_output_dir(args.out, args.overwrite, reads=(args.artifact,))


def run(args: argparse.Namespace) -> None:
    from sinkquant.backends.export import export
    from sinkquant.engine import load
    from sinkquant.io import check_output_dir

    check_output_dir(args.out, args.overwrite, reads=(args.artifact,))
    quantized = load(args.artifact, verify=not args.no_verify)
    folder = export(quantized, args.out, format=args.format, overwrite=args.overwrite)
    prefix = f"; prefix KV beside it ({len(quantized.prefix.ids)} tokens)" if quantized.prefix is not None else ""
    print(f"wrote {folder} ({args.format}){prefix}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write an artifact in a format serving engines load (compressed-tensors, "
                                                 "onnx)")
    p.add_argument("artifact", type=Path, help="a folder written by `sinkquant quantize`")
    p.add_argument("--format", default="compressed-tensors",
                   help="output format: compressed-tensors (vLLM) or onnx (ONNX Runtime, static int8 QDQ)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact's files")
    add_output_args(p)
    p.set_defaults(func=run, check=check)
