"""Profile wall time against a plain forward over the same calibration windows, in one run.

    python eval/bench_profile.py --ctx 512 --windows 4 --threads 1

Goal: collecting the profile (hooks, attention probe, streaming statistics) at <= 1.5x a plain forward."""

from __future__ import annotations

import tempfile
from pathlib import Path

import benchlib

from sinkquant.data import plan_windows
from sinkquant.profiling.profiler import profile
from sinkquant.tables import markdown_table


def main() -> None:
    parser = benchlib.parser(__doc__, windows=4, out="eval/results/profile_bench")
    parser.add_argument("--repeats", type=int, default=2, help="alternate plain forward and profile this many times")
    args = parser.parse_args()
    loaded, stream = benchlib.setup(args)
    plan = plan_windows(stream, args.ctx, calib_windows=args.windows)
    windows = stream.windows(args.ctx, list(plan.calib_windows))
    benchlib.timed_forward(loaded.model, windows[:1])  # warm-up
    plain, collect, total = [], [], []
    for _ in range(args.repeats):
        plain.append(benchlib.timed_forward(loaded.model, windows))
        with tempfile.TemporaryDirectory() as tmp:
            report = profile(loaded, stream, ctx=args.ctx, windows=args.windows, bos="never",
                             out=Path(tmp) / "report", progress=False)
        collect.append(report["run"]["collect_seconds"])
        total.append(report["run"]["seconds"])
    base = min(plain)
    table = markdown_table(["run", "best seconds", "ratio to plain forward"], [
        ["plain forward (sdpa, no hooks)", f"{base:.2f}", "1.00"],
        ["profile: collection (hooks + attention probe)", f"{min(collect):.2f}", f"{min(collect) / base:.2f}"],
        ["profile: total (+ origin/BOS probe, plots, report files)", f"{min(total):.2f}", f"{min(total) / base:.2f}"],
    ])
    body = (f"Model {args.model}, ctx {args.ctx}, {args.windows} calibration windows, best of {args.repeats} "
            f"alternating runs. Goal: collection <= 1.5x.\n\n{table}")
    benchlib.write_result(args.out, "Profile overhead", body, {
        "plain_seconds": plain, "collect_seconds": collect, "total_seconds": total,
        "collect_ratio": min(collect) / base, "total_ratio": min(total) / base})


if __name__ == "__main__":
    main()
