"""`sinkquant profile`: the command-line face of `sinkquant.profiling.profile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import add_data_args, add_model_args, add_output_args, load_inputs, note, positive_int


def run(args: argparse.Namespace) -> None:
    from sinkquant.artifacts import check_output_dir
    from sinkquant.profiling import profile

    if args.windows is not None:
        note("profile", "--windows is now --calib-windows (calibration windows); "
                        f"using --calib-windows {args.windows}")
        args.calib_windows = args.windows
    check_output_dir(args.out, args.overwrite)  # refuse before the slow part
    loaded, stream = load_inputs(args)
    report = profile(loaded, stream, ctx=args.ctx, windows=args.calib_windows, bos=args.bos, out=args.out,
                     progress=not args.quiet, overwrite=args.overwrite, probe=not args.no_probe)
    verdict = report["verdict"]
    print(f"sink positions {verdict['sink_positions']}, peak channels {verdict['peak_channels']}, "
          f"sink rate {report['attention']['sink_rate']['0.3']:.1f}% (eps 0.3), origin {verdict['origin']}, "
          f"prefix ids {verdict['prefix_ids']} {verdict['prefix_tokens']}")
    print(f"wrote {args.out}/report.json, report.html, report.md")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="measure residual peaks, outliers and attention sinks; write a report")
    add_model_args(p)
    add_data_args(p, ctx=512, max_windows=None, calib_windows=4,
                  calib_help="calibration windows to profile, from the end of the text")
    add_output_args(p)
    p.add_argument("--windows", type=positive_int, default=None, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.html, report.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-probe", action="store_true", help="skip the position-vs-content and BOS probe")
    p.set_defaults(func=run)
