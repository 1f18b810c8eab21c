"""Is the native backend faithful to the simulator? Every W8 recipe through `apply_recipe` with backend simulated
and native (nothing else changed), perplexity on the same windows (issue 12 item 3: within 0.3%).

    python eval/bench_faithful.py            # ctx 512, first 16 windows, each recipe's own calibration windows

With rounded activations a value within float rounding of a grid boundary can land one level apart in the two
backends; the simulator's own float32-vs-float64 spread on the same windows (the same math in double precision)
is printed beside each row, so a difference can be told from that noise."""

from __future__ import annotations

import copy

import benchlib
import yaml

from sinkquant.data import plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.perplexity import evaluate
from sinkquant.recipes import parse_recipe
from sinkquant.tables import markdown_table

RECIPES = ("w8a8-prefix-smooth-except", "w8a16", "w8a8-dynamic-token")
GOAL = 0.3  # percent


def main() -> None:
    p = benchlib.parser(__doc__, windows=16, out="eval/results/faithful")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = p.parse_args()
    loaded, stream = benchlib.setup(args)
    rows, payload = [], {}
    for name in args.recipes:
        data = yaml.safe_load((benchlib.REPO / "recipes" / f"{name}.yaml").read_text())
        recipe = parse_recipe(data)
        plan = plan_windows(stream, args.ctx, max_windows=args.windows, calib_windows=recipe.calibration.windows)
        simulated = apply_recipe(loaded, recipe, stream, ctx=args.ctx, copy=True)
        native = apply_recipe(loaded, parse_recipe({**data, "backend": "native"}), stream, ctx=args.ctx, copy=True)
        sim = simulated.evaluate(stream, plan, progress=False).ppl
        nat = native.evaluate(stream, plan, progress=False).ppl
        sim64 = None
        if recipe.scheme.activations is not None:
            sim64 = evaluate(loaded, stream, plan, bos="never", prefix=simulated.prefix,
                             model=copy.deepcopy(simulated.model).double(), progress=False).ppl
        delta = 100 * (nat / sim - 1)
        spread = None if sim64 is None else 100 * (sim64 / sim - 1)
        exact = None if sim64 is None else 100 * (nat / sim64 - 1)
        payload[name] = {"simulated": sim, "native": nat, "simulated_float64": sim64, "delta_pct": delta,
                         "native_vs_float64_pct": exact}
        rows.append([name, f"{sim:.4f}", f"{nat:.4f}", f"{delta:+.3f}%", "-" if spread is None else f"{spread:+.3f}%",
                     "-" if exact is None else f"{exact:+.3f}%", "PASS" if abs(delta) <= GOAL else "FAIL"])
        print(rows[-1], flush=True)
    body = (f"SmolLM2-135M, WikiText-2 test, ctx {args.ctx}, first {args.windows} windows, no BOS (a prefix recipe "
            f"brings its own); calibration on each recipe's windows from the end of the text. Goal: native within "
            f"{GOAL}% of simulated. The native backend's integer sums are exact, so the simulator in float64 is the "
            "reference that shows which of the two float32 results moved.\n\n"
            + markdown_table(["recipe", "simulated", "native", "native vs simulated", "simulated float64 vs float32",
                              "native vs simulated float64", f"within {GOAL}%"], rows))
    benchlib.write_result(args.out, "Native backend vs simulator", body, {"rows": payload, "ctx": args.ctx,
                                                                           "windows": args.windows})


if __name__ == "__main__":
    main()
