"""Evaluator throughput against a bare transformers forward loop over the same windows, in one run.

    python eval/bench_perplexity.py --ctx 512 --windows 16

Goal: sinkquant's evaluator at >= 0.9x the bare loop's tokens per second."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from sinkquant.artifacts import atomic_write_text, library_versions
from sinkquant.data import load_text, plan_windows, tokenize
from sinkquant.models import load_model
from sinkquant.perplexity import evaluate
from sinkquant.tables import markdown_table


def bare_loop(model, windows: torch.Tensor) -> float:
    """What a user would write: model(ids, labels=ids) per window."""
    start = time.perf_counter()
    with torch.no_grad():
        for window in windows:
            model(input_ids=window[None], labels=window[None]).loss.item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    parser.add_argument("--out", default="eval/results/perplexity_throughput.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    stream = tokenize(load_text(args.data), loaded.tokenizer)
    plan = plan_windows(stream, args.ctx, args.windows)
    windows = stream.windows(args.ctx, list(plan.eval_windows))
    bare_loop(loaded.model, windows[:1])  # warm-up
    bare, ours = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(loaded.model, windows))
        ours.append(evaluate(loaded, stream, plan, bos="never", progress=False).seconds)
    tokens = windows.numel()
    rows = [
        ["bare transformers loop", f"{min(bare):.2f}", f"{tokens / min(bare):.0f}", "1.00"],
        ["sinkquant evaluate", f"{min(ours):.2f}", f"{tokens / min(ours):.0f}", f"{min(bare) / min(ours):.2f}"],
    ]
    table = markdown_table(["loop", "best seconds", "tokens/s", "throughput vs bare"], rows)
    print(table)
    report = (
        f"# Evaluator throughput\n\nCommand: `{' '.join(['python', *sys.argv])}`\n\n"
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}; "
        f"model {args.model}, ctx {args.ctx}, {args.windows} windows, best of {args.repeats} alternating runs.\n\n"
        f"{table}\nVersions: {library_versions()}\n"
    )
    atomic_write_text(args.out, report)


if __name__ == "__main__":
    main()
