"""Is one recipe better than another beyond float rounding? Per-window NLL of each recipe on the same windows, in
the realizations bench_faithful.py measures a quantized model's float-rounding spread with (the unjittered run,
`--jitter` one-ulp input jitters, the same quantized model in float64), and a paired comparison of the first two
recipes over the windows.

    python eval/bench_recipe_noise.py --model qwen2.5-coder-0.5b --threads 1 --out /tmp/noise \\
        --recipes w8a8-prefix-smooth-except w8a8-prefix-smooth-except-act

Each recipe quantizes the model in place (a fresh load each), so only one quantized copy is held: run each recipe
in its own process where memory is short (`--recipes` one at a time with the same `--out`: a recipe whose JSON is
there is read back, not measured again)."""

from __future__ import annotations

import functools
import json
import math
import statistics

import benchlib
from bench_faithful import jittered

from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.engine import QuantizedModel, apply_recipe
from sinkquant.models import LoadedModel
from sinkquant.perplexity import PerplexityResult, evaluate
from sinkquant.recipe import load_recipe

FP32 = "fp32"
Z = 2.0  # the auto search's noise rule: a paired difference counts beyond 2 standard errors


def per_window(plan: WindowPlan, run_one: functools.partial[PerplexityResult]) -> list[float]:
    """Each evaluation window's NLL sum, one evaluation per window in the plan's order."""
    return [run_one(WindowPlan(plan.ctx, (w,), plan.calib_windows)).nll_sum for w in plan.eval_windows]


def jittered_per_window(quantized: QuantizedModel, seed: int, plan: WindowPlan,
                        one: functools.partial[PerplexityResult]) -> list[float]:
    """per_window under bench_faithful's jitter realization `seed` (one hook over all windows, as there)."""
    nll: list[float] = []

    def run() -> float:
        nll[:] = per_window(plan, one)
        return sum(nll)

    jittered(quantized, seed, run)
    return nll


def measure(loaded: LoadedModel, stream: TokenStream, name: str, ctx: int, windows: int,
            seeds: int) -> dict[str, list[float]]:
    """Per-window NLL of `name` (a shipped recipe, or fp32) in each realization."""
    if name == FP32:
        plan = plan_windows(stream, ctx, max_windows=windows, calib_windows=8)
        return {"plain": per_window(plan, functools.partial(evaluate, loaded, stream, bos="auto", progress=False))}
    recipe = load_recipe(benchlib.REPO / "recipes" / f"{name}.yaml")
    plan = plan_windows(stream, ctx, max_windows=windows, calib_windows=recipe.calibration.windows)
    quantized = apply_recipe(loaded, recipe, stream, ctx=ctx)
    one = functools.partial(quantized.evaluate, stream, bos="auto", progress=False)
    runs = {"plain": per_window(plan, one)}
    for seed in range(seeds):
        runs[f"jitter{seed}"] = jittered_per_window(quantized, seed, plan, one)
    double = quantized.model.double()  # in place: the float32 runs are done, and a copy may not fit in memory
    runs["float64"] = per_window(plan, functools.partial(evaluate, loaded, stream, bos="never",
                                                         prefix=quantized.prefix, model=double, progress=False))
    return runs


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """b - a per window: how many windows b wins, the mean difference and its z (mean / standard error)."""
    diff = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diff)
    return {"b_wins": sum(d < 0 for d in diff), "windows": len(diff), "mean_nats": mean,
            "z": mean / (statistics.stdev(diff) / math.sqrt(len(diff))), "per_window_nats": diff}


def main() -> None:
    p = benchlib.parser(__doc__, windows=8, out="/tmp/recipe-noise")
    p.add_argument("--recipes", nargs="+", required=True)
    p.add_argument("--jitter", type=int, default=3, help="jittered realizations per recipe")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[float]]] = {}
    for name in [FP32, *args.recipes]:
        path = args.out / f"{name}.json"
        if not path.is_file():
            loaded, stream = benchlib.setup(args)
            path.write_text(json.dumps(measure(loaded, stream, name, args.ctx, args.windows, args.jitter)))
            del loaded
        runs[name] = json.loads(path.read_text())
    tokens = (args.ctx - 1) * args.windows
    base = math.exp(sum(runs[FP32]["plain"]) / tokens)
    print(f"{args.model} fp32 perplexity {base:.4f} (ctx {args.ctx}, first {args.windows} windows)")
    for name in args.recipes:
        delta = {k: 100 * (math.exp(sum(v) / tokens) / base - 1) for k, v in runs[name].items()}
        print(f"{name}: " + ", ".join(f"{k} {v:+.3f}%" for k, v in delta.items())
              + f"; spread {max(delta.values()) - min(delta.values()):.3f} points")
    if len(args.recipes) >= 2:
        a, b = (dict(runs[n], mean=[statistics.fmean(w) for w in zip(*runs[n].values(), strict=True)])
                for n in args.recipes[:2])
        for k in a:
            result = paired(a[k], b[k])
            verdict = "beyond noise" if abs(result["z"]) > Z else "within noise"
            print(f"{args.recipes[1]} - {args.recipes[0]}, {k}: wins {result['b_wins']}/{result['windows']} windows, "
                  f"mean {result['mean_nats']:+.2f} nats/window, z {result['z']:+.2f} ({verdict}); per window "
                  + " ".join(f"{d:+.1f}" for d in result["per_window_nats"]))


if __name__ == "__main__":
    main()
