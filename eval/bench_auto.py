"""`--recipe auto` against the fixed recipes of its base scheme: the search's cost as a multiple of applying the
last fixed recipe listed for that scheme in FIXED (both measured in this run), and evaluation perplexity of fp32,
the fixed recipes and auto on the first evaluation windows. The search sees calibration windows only.

    python eval/bench_auto.py --threads 1                                                  # w8a8-static
    python eval/bench_auto.py --threads 1 --scheme w4a8kv8 --out eval/results/auto-int4"""

from __future__ import annotations

import time

from benchlib import REPO, parser, setup, write_result

from sinkquant.data import plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.perplexity import evaluate
from sinkquant.recipe import load_recipe
from sinkquant.search.config import SearchConfig
from sinkquant.search.loop import search_recipe, write_auto_recipe
from sinkquant.search.space import DEFAULT_BUDGET, DEFAULT_MAX_EXCEPTIONS

# Per base scheme: the fixed recipes beside auto, the fixed best last (its time and the search's are taken back to
# back; the cost goal is a multiple of it).
FIXED = {
    "w8a8-static": ("w8a8-naive", "w8a8-dynamic-token", "w8a8-prefix-smooth-except"),
    "w4a8kv8": ("w4a8kv8-prefix-clip", "w4a8kv8-prefix-smooth-except", "w4a8kv8-rotate-prefix-gptq"),
    "w4a4kv4": ("w4a4kv4-rotate-dynamic", "w4a4kv4-prefix-clip", "w4a4kv4-rotate-prefix-gptq"),
}


def timed(fn, *args, **kwargs):
    """The call's result, wall seconds and this process's CPU seconds (steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = parser(__doc__, windows=8, out="eval/results/auto")
    p.add_argument("--scheme", default="w8a8-static", choices=list(FIXED))
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET)
    p.add_argument("--max-exceptions", type=int, default=DEFAULT_MAX_EXCEPTIONS)
    args = p.parse_args()
    loaded, stream = setup(args)
    plan = plan_windows(stream, args.ctx, max_windows=args.windows, calib_windows=args.calib_windows)
    rows = [{"recipe": "fp32", "ppl": evaluate(loaded, stream, plan, bos="auto", progress=False).ppl,
             "quantize_s": 0.0, "quantize_cpu_s": 0.0}]
    print(rows[-1], flush=True)
    fixed = FIXED[args.scheme]
    for name in fixed:
        quantized, wall, cpu = timed(apply_recipe, loaded, load_recipe(REPO / f"recipes/{name}.yaml"), stream,
                                     args.ctx, copy=True)
        rows.append({"recipe": name, "ppl": quantized.evaluate(stream, plan, progress=False).ppl,
                     "quantize_s": wall, "quantize_cpu_s": cpu})
        print(rows[-1], flush=True)
        del quantized
    config = SearchConfig(scheme=args.scheme, ctx=args.ctx, calib_windows=args.calib_windows, budget=args.budget,
                          max_exceptions=args.max_exceptions)
    (recipe, trace), search_s, search_cpu = timed(search_recipe, loaded, stream, config)
    path, _ = write_auto_recipe(recipe, trace, args.out.with_name(f"{args.out.name}-{args.scheme}.yaml"))
    quantized, apply_s, apply_cpu = timed(apply_recipe, loaded, recipe, stream, args.ctx, copy=True)
    rows.append({"recipe": f"auto ({args.scheme})", "ppl": quantized.evaluate(stream, plan, progress=False).ppl,
                 "quantize_s": search_s + apply_s, "quantize_cpu_s": search_cpu + apply_cpu})
    print(rows[-1], flush=True)
    best = next(r for r in rows if r["recipe"] == fixed[-1])
    ratio = rows[-1]["quantize_s"] / best["quantize_s"]
    cpu_ratio = rows[-1]["quantize_cpu_s"] / best["quantize_cpu_s"]
    fp32 = rows[0]["ppl"]
    lines = ["| recipe | perplexity | vs fp32 | quantize s | quantize CPU s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['recipe']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp32 - 1):+.2f}% | {r['quantize_s']:.1f} | "
              f"{r['quantize_cpu_s']:.1f} |" for r in rows]
    kept = ", ".join(a["step"] for a in trace["ablation"] if a["kept"]) or "none"
    body = "\n".join([
        f"{loaded.spec}, ctx {args.ctx}, first {args.windows} evaluation windows; the search and every static recipe "
        f"calibrate on the last {args.calib_windows} windows of the text only.",
        "", *lines, "",
        f"Cost of auto (search {search_s:.1f} s + applying the chosen recipe {apply_s:.1f} s): {ratio:.2f}x the time "
        f"of applying {fixed[-1]} in wall seconds, {cpu_ratio:.2f}x in CPU seconds (the search alone: "
        f"{search_s / best['quantize_s']:.2f}x wall, {search_cpu / best['quantize_cpu_s']:.2f}x CPU).",
        f"Chosen recipe: [{path.name}]({path.name}) (trace beside it), steps kept: {kept}; calibration objective "
        f"(mean KL to fp32, nats/token) naive {trace['naive_objective']:.4f} -> chosen "
        f"{trace['chosen_objective']:.4f}, budget {trace['budget']} {'met' if trace['budget_met'] else 'not met'}.",
    ])
    write_result(args.out, "--recipe auto vs the fixed recipes", body, {
        "rows": rows, "search_s": search_s, "search_cpu_s": search_cpu, "apply_s": apply_s, "apply_cpu_s": apply_cpu,
        "ratio": ratio, "cpu_ratio": cpu_ratio, "recipe": recipe.resolved(), "ablation": trace["ablation"],
        "ctx": args.ctx, "windows": args.windows,
    })


if __name__ == "__main__":
    main()
