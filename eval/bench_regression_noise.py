"""Noise floor of the shipped regression baselines: each baseline's recipe on every CPU kernel path this machine
can run (one subprocess each), at several ctx x windows, as the relative spread of perplexity between paths.

    python eval/bench_regression_noise.py --ctx 128 256 512 --windows 32 16 8

Quantized perplexity moves with kernel rounding (fp32 barely does); the spread shrinks as more tokens are scored.
The shipped baselines' ctx/windows are chosen from this table so that K_SPREAD x spread stays below rel_tol."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import benchlib

from sinkquant.data import WindowPlan, plan_windows
from sinkquant.perplexity import evaluate
from sinkquant.recipes import apply_recipe, load_recipe
from sinkquant.regression import K_SPREAD, cpu_kernel, kernel_env, lower_kernel_paths, read_baseline, recipe_path
from sinkquant.tables import markdown_table

BASELINES = sorted((benchlib.REPO / "eval" / "baselines").glob("*.json"))
FP32 = "fp32"
SUBSETS = (2, 4, 8, 16, 32)


def worker(args: argparse.Namespace) -> None:
    """Per-window NLL sums of fp32 and every baseline recipe at each ctx, on this process's kernel path."""
    loaded, stream = benchlib.setup(args)
    recipes = {p.stem: load_recipe(recipe_path(p, read_baseline(p))) for p in BASELINES}
    rows = []
    for ctx, windows in zip(args.ctx, args.windows, strict=True):
        plan = plan_windows(stream, ctx, windows, calib_windows=max(r.calibration.windows for r in recipes.values()))
        singles = [WindowPlan(ctx=ctx, eval_windows=(w,), calib_windows=plan.calib_windows) for w in plan.eval_windows]
        models = {FP32: None, **{name: apply_recipe(loaded, r, stream, ctx=ctx) for name, r in recipes.items()}}
        for name, quantized in models.items():
            results = [evaluate(loaded, stream, p, bos="never", progress=False) if quantized is None
                       else quantized.evaluate(stream, p, bos="never", progress=False) for p in singles]
            rows.append({"recipe": name, "ctx": ctx, "nll": [r.nll_sum for r in results],
                         "tokens": [r.tokens for r in results]})
            print(f"{cpu_kernel()} ctx {ctx} {name} done", file=sys.stderr, flush=True)
    print(json.dumps({"kernel": cpu_kernel(), "rows": rows}))


def run_worker(args: argparse.Namespace, kernel: str | None) -> dict:
    argv = [sys.executable, __file__, "--worker", "--model", args.model, "--data", args.data, "--threads",
            str(args.threads), "--ctx", *map(str, args.ctx), "--windows", *map(str, args.windows)]
    proc = subprocess.run(argv, env=kernel_env(kernel), stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    runs = [run_worker(args, None)]
    runs += [run_worker(args, k) for k in lower_kernel_paths(runs[0]["kernel"])]
    kernels = [r["kernel"] for r in runs]
    table, results = [], []
    for i, row in enumerate(runs[0]["rows"]):
        for n in (s for s in SUBSETS if s <= len(row["nll"])):
            ppls = [math.exp(sum(r["rows"][i]["nll"][:n]) / sum(r["rows"][i]["tokens"][:n])) for r in runs]
            spread = (max(ppls) - min(ppls)) / (sum(ppls) / len(ppls))
            tokens = sum(row["tokens"][:n])
            results.append({"recipe": row["recipe"], "ctx": row["ctx"], "windows": n, "tokens": tokens,
                            "ppl": dict(zip(kernels, ppls, strict=True)), "spread": spread})
            table.append([row["recipe"], row["ctx"], n, tokens, *(f"{p:.3f}" for p in ppls), f"{100 * spread:.2f}%",
                          f"{100 * K_SPREAD * spread:.2f}%"])
    body = (f"Model {args.model}, BOS never, calibration 8 windows from the end of the text, evaluation windows from "
            f"its start; every kernel path in its own process (`ATEN_CPU_CAPABILITY`), "
            f"{args.threads} thread(s). Spread = (max - min) / mean over kernel paths; a baseline's noise "
            f"tolerance is K_SPREAD = {K_SPREAD:g} x spread.\n\n"
            + markdown_table(["recipe", "ctx", "windows", "scored tokens", *(f"ppl {k}" for k in kernels), "spread",
                              f"{K_SPREAD:g} x spread"], table))
    benchlib.write_result(args.out, "Regression noise floor: perplexity spread between CPU kernel paths", body,
                          {"kernels": kernels, "rows": results, "raw": runs})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--ctx", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 16, 8], help="evaluation windows per ctx")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each kernel path's process")
    parser.add_argument("--out", type=Path, default=benchlib.REPO / "eval/results/regression_noise")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else main(args)
