"""llm-compressor as a peer, on the same calibration and evaluation windows as sinkquant's rows (issue 12).

    python eval/bench_llmcompressor.py                 # ctx 512, first 16 windows scored, last 8 calibrate
    python eval/bench_llmcompressor.py --sinkquant     # also sinkquant's best static W8A8 (simulated and native)

llmcompressor pins an older transformers than sinkquant's, so it never enters sinkquant's environment: the
benchmark creates its own virtual environment (`--venv`, default out/venvs/llmcompressor; torch first, from the
same pinned CPU build, then llmcompressor at a pinned version) and runs each variant there in a child process.
The parent hands the child the model as a plain safetensors folder (what sinkquant loads from the embedded GGUF)
and the exact token ids of the calibration and evaluation windows; the child quantizes with llm-compressor's
`oneshot` and scores the windows with the same protocol as `sinkquant.evaluate` (no BOS, every token after the
first of a window, summed NLL), so the fp32 row must equal sinkquant's to float noise. Variants:
  fp32                      the model as the child loads it (protocol check)
  w8a8-static               int8 per-channel weights, int8 static per-tensor input activations (QuantizationModifier)
  smoothquant-w8a8-static   SmoothQuantModifier(smoothing_strength=0.8) first, then the same
  w8a16                     int8 per-channel weights only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib
from safetensors.torch import save_file

from sinkquant.data import plan_windows
from sinkquant.tables import markdown_table

TORCH = "torch==2.13.0"
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
VARIANTS = ("fp32", "w8a8-static", "smoothquant-w8a8-static", "w8a16")
SINKQUANT = {
    "sinkquant w8a8-prefix-smooth-except (simulated)": "recipes/w8a8-prefix-smooth-except.yaml",
    "sinkquant w8a8-prefix-smooth-except-native (int8 kernels)": "recipes/w8a8-prefix-smooth-except-native.yaml",
}
# Measured by the author with llm-compressor at the defaults (ctx 512, 16 + 8 windows); the rows here
# must reproduce them there.
EXPECTED = {"fp32": 36.002, "w8a8-static": 77.67, "smoothquant-w8a8-static": 64.83}

CHILD = r'''
import json, math, sys
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

model_dir, windows_file, variant = sys.argv[1:4]
torch.manual_seed(0)
windows = load_file(windows_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
if variant != "fp32":
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    inputs = None if variant == "w8a16" else QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                                              strategy="tensor", dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs)
    recipe = [QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    if variant.startswith("smoothquant"):
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=0.8))
    calib = windows["calib"]
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0])  # its default pipeline (sequential), as the issue measured
nll, tokens = 0.0, 0
with torch.no_grad():
    for window in windows["eval"]:
        logits = model(input_ids=window[None]).logits[0]
        nll += float(F.cross_entropy(logits[:-1].float(), window[1:], reduction="sum"))
        tokens += window.numel() - 1
import llmcompressor, transformers
print("RESULT " + json.dumps({"ppl": math.exp(nll / tokens), "tokens": tokens,
                              "versions": {"llmcompressor": llmcompressor.__version__,
                                           "transformers": transformers.__version__, "torch": torch.__version__}}))
'''


def ensure_venv(venv: Path) -> Path:
    """The peer's own environment, created once (torch first: a bare torch requirement pulls a CUDA build)."""
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.is_file() and marker.read_text() == LLMCOMPRESSOR:
        return python
    print(f"creating {venv} with {TORCH} and {LLMCOMPRESSOR} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for package in (TORCH, LLMCOMPRESSOR):
        subprocess.run([str(python), "-m", "pip", "install", "-q", package], check=True)
    marker.write_text(LLMCOMPRESSOR)
    return python


def run_child(python: Path, model_dir: Path, windows_file: Path, variant: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([str(python), "-c", CHILD, str(model_dir), str(windows_file), variant],
                          capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def sinkquant_rows(loaded, stream, plan, ctx: int) -> dict[str, dict]:
    from sinkquant.engine import apply_recipe
    from sinkquant.recipe import load_recipe

    rows = {}
    for name, path in SINKQUANT.items():
        quantized = apply_recipe(loaded, load_recipe(benchlib.REPO / path), stream, ctx, copy=True)
        rows[name] = {"ppl": quantized.evaluate(stream, plan, bos="never", progress=False).ppl}
        print(name, rows[name], flush=True)
    return rows


def main() -> None:
    p = benchlib.parser(__doc__, windows=16, out="eval/results/llmcompressor")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--venv", type=Path, default=benchlib.REPO / "out/venvs/llmcompressor")
    p.add_argument("--sinkquant", action="store_true", help="also sinkquant's best static W8A8 on the same windows")
    args = p.parse_args()
    loaded, stream = benchlib.setup(args)
    plan = plan_windows(stream, args.ctx, max_windows=args.windows, calib_windows=args.calib_windows)
    python = ensure_venv(args.venv)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sinkquant-llmcompressor-") as tmp:
        model_dir, windows_file = Path(tmp) / "model", Path(tmp) / "windows.safetensors"
        loaded.model.save_pretrained(model_dir)
        loaded.tokenizer.save_pretrained(model_dir)
        save_file({"eval": stream.windows(args.ctx, list(plan.eval_windows)),
                   "calib": stream.windows(args.ctx, list(plan.calib_windows))}, str(windows_file))
        for variant in args.variants:
            rows[f"llm-compressor {variant}"] = run_child(python, model_dir, windows_file, variant)
            print(variant, rows[f"llm-compressor {variant}"], flush=True)
    if args.sinkquant:
        rows.update(sinkquant_rows(loaded, stream, plan, args.ctx))
    fp32 = rows.get("llm-compressor fp32", {}).get("ppl")
    defaults = (args.ctx, args.windows, args.calib_windows) == (512, 16, 8)
    body_rows = []
    for name, row in rows.items():
        variant = name.removeprefix("llm-compressor ")
        expected = EXPECTED.get(variant) if defaults and name.startswith("llm-compressor") else None
        if "error" in row:
            body_rows.append([name, f"failed: {row['error']}", "-", "-"])
            continue
        body_rows.append([name, f"{row['ppl']:.3f}", f"{100 * (row['ppl'] / fp32 - 1):+.1f}%" if fp32 else "-",
                          f"{expected:.2f}" if expected else "-"])
    body = (f"SmolLM2-135M, WikiText-2 test, ctx {args.ctx}: the first {args.windows} windows scored, the last "
            f"{args.calib_windows} calibrate (token ids handed to the child, so both sides see the same), no BOS. "
            f"llm-compressor runs in its own environment ({args.venv}, {LLMCOMPRESSOR}).\n\n"
            + markdown_table(["variant", "perplexity", "vs fp32", "issue author's value"], body_rows))
    benchlib.write_result(args.out, "llm-compressor as a peer", body,
                          {"rows": rows, "expected": EXPECTED, "ctx": args.ctx, "windows": list(plan.eval_windows),
                           "calib_windows": list(plan.calib_windows), "llmcompressor": LLMCOMPRESSOR})


if __name__ == "__main__":
    main()
