"""Peak memory and time of quantizing by a recipe, this code against an earlier commit, in one run.

    python eval/bench_quantize_memory.py --before de96285

Each (code, model) pair runs in a fresh subprocess that loads the model, applies the recipe (calibration on the
last windows of WikiText-2) and reports its peak RSS and the recipe's wall time. Memory is reported as the peak
above the process's footprint before the model was built (the kernel's peak counter is reset there, so the
text and tokenizer loaded before cannot hide part of it), divided by the model's fp32 weight bytes: the goal
is at most 1.3x (the weights plus one layer's activations; today's engine deep-copies the model, above 2x).
The earlier commit is checked out into a temporary git worktree. Models: the embedded SmolLM2-135M, and
Qwen2-0.5B's architecture with random weights (memory depends on shapes; no 0.5B checkpoint is offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib

from sinkquant.tables import markdown_table

GB = 1024**3
MODELS = ("smollm2-135m", "qwen2-0.5b-random")
GOAL = 1.3

CHILD = r"""
import json, sys, time
import torch
from transformers import AutoTokenizer, Qwen2Config
from sinkquant.data import load_text, tokenize
from sinkquant.models import load_model, random_model
from sinkquant.recipe import load_recipe
try:  # this code
    from sinkquant.engine import apply_recipe
except ImportError:  # the engine before the step components
    from sinkquant.recipe import apply_recipe

def status(field):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def reset_peak():  # Linux >= 4.0: the peak restarts from the current RSS, so tokenizing does not hide it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

model, recipe_path, tokenizer_dir = sys.argv[1:4]
ctx, threads = int(sys.argv[4]), int(sys.argv[5])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
stream = tokenize(load_text("wikitext2"), tokenizer)
recipe = load_recipe(recipe_path)
reset_peak()
start = status("VmRSS")
if model == "qwen2-0.5b-random":
    config = Qwen2Config(**json.loads(sys.argv[6]))
    loaded = random_model(config, tokenizer, spec=model)
else:
    loaded = load_model(model)
weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
clock = time.perf_counter()
quantized = apply_recipe(loaded, recipe, stream, ctx=ctx)
seconds = time.perf_counter() - clock
print(json.dumps({"start": start, "peak": status("VmHWM"), "weights": weights, "seconds": seconds}))
"""


def _run(code: Path, model: str, args, tokenizer_dir: Path) -> dict:
    from bench_profile_memory import QWEN2_05B

    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-c", CHILD, model, str(code / "recipes" / f"{args.recipe}.yaml"), str(tokenizer_dir),
               str(args.ctx), str(args.threads or 0), json.dumps(QWEN2_05B)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=code)
    if proc.returncode != 0:
        raise SystemExit(f"{model} with {code}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchlib.parser(__doc__, windows=8, out="eval/results/quantize_memory")
    parser.add_argument("--before", default="de96285", help="git commit of the earlier engine")
    parser.add_argument("--recipe", default="w8a8-prefix-smooth-except")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=2, help="runs per (code, model); the shortest time counts")
    args = parser.parse_args()
    from sinkquant.models import load_model

    tokenizer_dir = Path(tempfile.mkdtemp(prefix="sinkquant-tokenizer-"))
    load_model("smollm2-135m").tokenizer.save_pretrained(tokenizer_dir)  # also warms the model cache
    rows, runs = [], {}
    with tempfile.TemporaryDirectory(prefix="sinkquant-before-") as tmp:
        before = Path(tmp) / "code"
        subprocess.run(["git", "-C", str(benchlib.REPO), "worktree", "add", "-q", "--detach", str(before),
                        args.before], check=True)
        try:
            for model in args.models:
                for repeat in range(args.repeats):  # alternating, so a slow spell of the machine hits both
                    for label, code in (("before", before), ("after", benchlib.REPO)):
                        result = _run(code, model, args, tokenizer_dir)
                        result["ratio"] = (result["peak"] - result["start"]) / result["weights"]
                        runs.setdefault(f"{model}/{label}", []).append(result)
                        print(f"{model} {label} run {repeat + 1}: peak +{(result['peak'] - result['start']) / GB:.2f}"
                              f" GiB = {result['ratio']:.2f}x weights, {result['seconds']:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(benchlib.REPO), "worktree", "remove", "--force", str(before)],
                           check=False)
    # The largest peak and the shortest time of the repeats (timing noise only ever adds seconds).
    results = {key: {**max(rs, key=lambda r: r["ratio"]), "seconds": min(r["seconds"] for r in rs),
                     "all_seconds": [r["seconds"] for r in rs], "all_ratios": [r["ratio"] for r in rs]}
               for key, rs in runs.items()}
    checks = []
    for model in args.models:
        old, new = results[f"{model}/before"], results[f"{model}/after"]
        rows.append([model, f"{new['weights'] / GB:.2f}", f"{old['ratio']:.2f}x", f"{new['ratio']:.2f}x",
                     f"{old['seconds']:.1f}", f"{new['seconds']:.1f}", f"{new['seconds'] / old['seconds']:.2f}"])
        checks.append((new["ratio"] <= GOAL, f"{model}: peak {new['ratio']:.2f}x the fp32 weights (goal <= {GOAL}x)"))
        checks.append((new["seconds"] <= old["seconds"] * 1.05,
                       f"{model}: quantize time {new['seconds'] / old['seconds']:.2f}x the earlier engine's "
                       "(goal: no slower, 5% noise allowed)"))
    body = (f"Recipe {args.recipe}, ctx {args.ctx}, calibration on the last 8 WikiText-2 windows; before = commit "
            f"{args.before}, after = this checkout. Peak RSS above the process's footprint before the model was "
            "built, as a multiple of the fp32 weight bytes; the largest peak and the shortest time of "
            f"{args.repeats} alternating runs each.\n\n"
            + markdown_table(["model", "fp32 weights (GiB)", "peak before", "peak after", "quantize s before",
                              "quantize s after", "time ratio"], rows)
            + "\n\nChecks:\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in checks))
    benchlib.write_result(args.out, "Quantize memory and time, before and after the engine rewrite", body,
                          {"results": results, "checks": [{"passed": ok, "check": t} for ok, t in checks],
                           "before": args.before, "recipe": args.recipe})


if __name__ == "__main__":
    main()
