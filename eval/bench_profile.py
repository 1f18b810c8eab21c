"""Profile wall time against a plain forward over the same calibration windows, in one run.

    python eval/bench_profile.py --ctx 512 --windows 4

Goal: collecting the profile (hooks, attention probe, streaming statistics) at <= 1.5x a plain forward."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sinkquant.artifacts import atomic_write_text, library_versions
from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.models import load_model
from sinkquant.profiling import profile
from sinkquant.tables import markdown_table


def plain_forward(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """What a user would run: model(ids) per window, default attention, no hooks."""
    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain forward and profile this many times")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own); 1 gives steadier ratios on a shared machine")
    parser.add_argument("--out", default="eval/results/profile_bench.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    stream = tokenize(load_text(args.data), loaded.tokenizer)
    plan = plan_windows(stream, args.ctx, calib_windows=args.windows)
    windows = stream.windows(args.ctx, list(plan.calib_windows))
    plain_forward(loaded.model, windows[:1])  # warm-up
    plain, collect, total = [], [], []
    for _ in range(args.repeats):
        plain.append(plain_forward(loaded.model, windows))
        with tempfile.TemporaryDirectory() as tmp:
            report = profile(loaded, stream, ctx=args.ctx, windows=args.windows, bos="never",
                             out=Path(tmp) / "report", progress=False)
        collect.append(report["run"]["collect_seconds"])
        total.append(report["run"]["seconds"])
    base = min(plain)
    rows = [
        ["plain forward (sdpa, no hooks)", f"{base:.2f}", "1.00"],
        ["profile: collection (hooks + attention probe)", f"{min(collect):.2f}", f"{min(collect) / base:.2f}"],
        ["profile: total (+ origin/BOS probe, plots, report files)", f"{min(total):.2f}", f"{min(total) / base:.2f}"],
    ]
    table = markdown_table(["run", "best seconds", "ratio to plain forward"], rows)
    print(table)
    print(f"profile / forward ratio: {min(collect) / base:.2f} (goal <= 1.5)")
    text = (
        f"# Profile overhead\n\nCommand: `{' '.join(['python', *sys.argv])}`\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}; "
        f"model {args.model}, ctx {args.ctx}, {args.windows} calibration windows, best of {args.repeats} "
        "alternating runs. The machine is shared, so compare ratios from one run only.\n\n"
        f"{table}\nVersions: {library_versions()}\n"
    )
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
