"""`sinkquant profile`: the command-line face of `sinkquant.profiling.profiler.profile`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sinkquant.cli.args import add_data_args, add_model_args, add_output_args
from sinkquant.cli.loading import load_kwargs, token_stream
from sinkquant.errors import SinkquantError


def _named(specs: list[str] | None) -> dict[str, str]:
    """--data entries as {name: spec}; a bare SPEC is named after itself (a file's stem)."""
    named: dict[str, str] = {}
    for entry in specs or ["wikitext2"]:
        name, sep, spec = entry.partition("=")
        if not sep:
            name, spec = Path(entry).stem or entry, entry
        if not name or not spec:
            raise SinkquantError(f"--data {entry!r}: expected NAME=SPEC or SPEC")
        if name in named:
            raise SinkquantError(f"--data: the name {name!r} is given twice; name each text differently")
        named[name] = spec
    return named


def check(args: argparse.Namespace) -> None:
    """Before torch: --out may be written, and --data entries are well formed."""
    from sinkquant.io import check_output_dir

    check_output_dir(args.out, args.overwrite, reads=(args.model,))
    _named(args.data)


def run(args: argparse.Namespace) -> None:
    from sinkquant.io import check_output_dir
    from sinkquant.models import load_model, load_tokenizer
    from sinkquant.profiling.context import CONTEXT_LENGTHS
    from sinkquant.profiling.profiler import profile
    from sinkquant.profiling.verdict import Verdict

    check_output_dir(args.out, args.overwrite)  # refuse before the slow part
    texts = _named(args.data)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)  # a short text is refused before the model loads
    streams = {name: token_stream(args, tokenizer, spec, windows=args.calib_windows, needs="--calib-windows")
               for name, spec in texts.items()}
    loaded = load_model(args.model, **load_kwargs(args))
    report = profile(loaded, streams if len(streams) > 1 else next(iter(streams.values())), ctx=args.ctx,
                     windows=args.calib_windows, bos=args.bos, out=args.out, progress=not args.quiet,
                     overwrite=args.overwrite, probe=not args.no_probe, interventions=args.interventions,
                     context_lengths=CONTEXT_LENGTHS if args.context_sweep else None, seed=args.seed)
    verdict = Verdict.of(report)
    print(f"sink positions {verdict.sink_positions}, peak channels {verdict.peak_channels}, "
          f"sink rate {report['attention']['sink_rate']['0.3']:.1f}% (eps 0.3), origin {verdict.origin}, "
          f"prefix ids {verdict.prefix_ids} {verdict.prefix_tokens}")
    print(f"recommended: {report['recommendation']['command']}\n  or search one: "
          f"{report['recommendation']['auto_command']}")
    print(f"wrote {args.out}/report.json, report.html, report.md")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="measure residual peaks, outliers and attention sinks; write a report")
    add_model_args(p)
    add_data_args(p, ctx=512, max_windows=None, calib_windows=4,
                  calib_help="calibration windows to profile, from the end of the text", several=True)
    add_output_args(p)
    p.add_argument("--interventions", action="store_true",
                   help="perplexity with the massive activations zeroed / set to their mean (Sun et al.)")
    p.add_argument("--context-sweep", action="store_true",
                   help="sink rate and peaks against context length, with and without BOS (Barbero et al.)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control intervention")
    p.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.html, report.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-probe", action="store_true", help="skip the position-vs-content and BOS probe")
    p.set_defaults(func=run, check=check)
