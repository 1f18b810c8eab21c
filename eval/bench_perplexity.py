"""Evaluator throughput against a bare transformers forward loop over the same windows, in one run.

    python eval/bench_perplexity.py --ctx 512 --windows 16

Goal: sinkquant's evaluator at >= 0.9x the bare loop's tokens per second."""

from __future__ import annotations

import benchlib

from sinkquant.data import plan_windows
from sinkquant.perplexity import evaluate
from sinkquant.tables import markdown_table


def main() -> None:
    parser = benchlib.parser(__doc__, windows=16, out="eval/results/perplexity_throughput")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    args = parser.parse_args()
    loaded, stream = benchlib.setup(args)
    plan = plan_windows(stream, args.ctx, args.windows)
    windows = stream.windows(args.ctx, list(plan.eval_windows))
    benchlib.timed_forward(loaded.model, windows[:1], loss=True)  # warm-up
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(benchlib.timed_forward(loaded.model, windows, loss=True))
        ours.append(evaluate(loaded, stream, plan, bos="never", progress=False).seconds)
    tokens = windows.numel()
    ratio = min(bare) / min(ours)
    table = markdown_table(["loop", "best seconds", "tokens/s", "throughput vs bare"], [
        ["bare transformers loop", f"{min(bare):.2f}", f"{tokens / min(bare):.0f}", "1.00"],
        ["sinkquant evaluate", f"{min(ours):.2f}", f"{tokens / min(ours):.0f}", f"{ratio:.2f}"],
    ])
    body = (f"Model {args.model}, ctx {args.ctx}, {args.windows} windows, best of {args.repeats} alternating "
            f"runs. Goal: >= 0.9x.\n\n{table}")
    benchlib.write_result(args.out, "Evaluator throughput", body,
                          {"bare_seconds": bare, "evaluate_seconds": ours, "throughput_ratio": ratio})


if __name__ == "__main__":
    main()
