"""Prefix selection: wall time of the profile-ranked (PrefixQuant) and greedy (CushionCache) selections, and what
each leaves for a static scale to cover (the largest Linear input after the prefix), in one run.

    python eval/bench_prefix.py --ctx 512 --max-tokens 4

Goal: selection for SmolLM2 in at most 30 s on this CPU."""

from __future__ import annotations

import time

import benchlib

from sinkquant.engine.apply import calibration_windows
from sinkquant.recipe import parse_recipe
from sinkquant.steps.prefix import max_linear_input, select_prefix_ids
from sinkquant.tables import markdown_table


def main() -> None:
    parser = benchlib.parser(__doc__, windows=8, out="eval/results/prefix_selection")
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    loaded, stream = benchlib.setup(args)
    rows, payload = [], {}
    sample = None
    for how in ("profile", "greedy"):
        recipe = parse_recipe({"name": how, "description": how, "calibration": {"windows": args.windows},
                               "steps": [{"prefix": {"tokens": how, "max_tokens": args.max_tokens}}],
                               "scheme": {"weights": {"bits": 8}}})
        windows = calibration_windows(stream, recipe, args.ctx)
        sample = windows[-1:, :256] if sample is None else sample  # one held-out window slice, same for both
        start = time.perf_counter()
        ids, _ = select_prefix_ids(loaded, windows[:-1], args.max_tokens, "auto", how)
        seconds = time.perf_counter() - start
        peak = max_linear_input(loaded, loaded.model, ids, sample)
        tokens = [loaded.tokenizer.decode([i]) for i in ids]
        payload[how] = {"ids": ids, "tokens": tokens, "seconds": seconds, "max_linear_input": peak}
        rows.append([how, " ".join(repr(t) for t in tokens), f"{seconds:.1f}", f"{peak:.1f}"])
    none = max_linear_input(loaded, loaded.model, [], sample)
    rows.append(["no prefix", "-", "-", f"{none:.1f}"])
    table = markdown_table(["selection", "prefix", "seconds", "largest Linear input after it"], rows)
    body = (f"Model {args.model}, ctx {args.ctx}, selection on {args.windows - 1} calibration windows, the peak "
            f"measured on 256 tokens of another calibration window. Goal: <= 30 s.\n\n{table}")
    benchlib.write_result(args.out, "Prefix selection", body, payload)


if __name__ == "__main__":
    main()
