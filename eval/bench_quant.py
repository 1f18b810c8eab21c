"""Benchmark: perplexity of simulated and real quantization schemes on SmolLM2-135M / WikiText-2.

Simulated rows run on every evaluation window. The real CPU backends (bitsandbytes, optimum-quanto,
torchao) run int8 kernels 30-60x slower than fp32 on CPU, so they are scored on the first
--backend-windows windows, next to fp32 and the simulated static W8A8 scored on those same windows and
calibrated on the same data as quanto (the faithfulness cross-check). Writes eval/results/quant_table.md
and .json atomically with the command, machine and library versions."""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from sinkquant.artifacts import atomic_write_json, atomic_write_text, library_versions
from sinkquant.data import WIKITEXT2_ENV, load_text, plan_windows, tokenize
from sinkquant.models import load_model
from sinkquant.perplexity import evaluate
from sinkquant.quant import ActivationSpec, KeepPolicy, QuantScheme, WeightSpec, quantize_model
from sinkquant.quant.backends import quantize_backend

REPO = Path(__file__).resolve().parent.parent
W8 = WeightSpec(8, "channel")
STATIC = ActivationSpec(8, "static")
SIMULATED = {
    "W8A16 (sim, per-channel)": QuantScheme(weights=W8),
    "W8A8 dynamic per-token (sim)": QuantScheme(weights=W8, activations=ActivationSpec(8, "dynamic-token")),
    "W8A8 static per-tensor naive (sim)": QuantScheme(weights=W8, activations=STATIC),
    "W8A8 static per-tensor, token 0 kept fp32 (sim)": QuantScheme(
        weights=W8, activations=STATIC, keep=KeepPolicy(positions=(0,))
    ),
    "W4A16 per-group 64 (sim)": QuantScheme(weights=WeightSpec(4, "group", 64, symmetric=False)),
}
BACKENDS = {
    "quanto W8A8 (own Calibration)": "quanto-w8a8",
    "bnb LLM.int8 (threshold 6.0)": "bnb-int8",
    "bnb nf4": "bnb-nf4",
    "torchao int8 dynamic": "torchao-int8dyn",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--backend-windows", type=int, default=2)
    parser.add_argument("--backend-calib-windows", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "eval/results/quant_table")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = os.environ.get(WIKITEXT2_ENV, str(REPO.parent / "shared/data/wikitext-2-raw/wiki.test.raw"))
    loaded = load_model("smollm2-135m")
    stream = tokenize(load_text(data), loaded.tokenizer)
    plan = plan_windows(stream, args.ctx, args.windows, args.calib_windows)
    calib = [stream.windows(args.ctx, [i]) for i in plan.calib_windows]
    backend_plan = replace(plan, eval_windows=plan.eval_windows[: args.backend_windows])
    backend_calib = calib[: args.backend_calib_windows]
    rows: list[dict] = []

    def score(label: str, model: torch.nn.Module, which, seconds: float, calib_windows: int, **extra) -> None:
        result = evaluate(loaded, stream, which, bos="never", model=model, progress=False)
        rows.append({"scheme": label, "ppl": result.ppl, "windows": result.windows, "calib_windows": calib_windows,
                     "quantize_s": round(seconds, 1), "eval_s": round(result.seconds, 1), **extra})
        print(f"{label:52s} ppl {result.ppl:9.3f}  windows {result.windows}", flush=True)

    score("fp32", loaded.model, plan, 0.0, 0)
    for label, scheme in SIMULATED.items():
        start = time.perf_counter()
        model = copy.deepcopy(loaded.model)
        used = calib if scheme.needs_calibration else None
        quantize_model(model, loaded.adapter, scheme, calib_batches=used)
        score(label, model, plan, time.perf_counter() - start, len(used or []))
        del model
    score("fp32 [backend windows]", loaded.model, backend_plan, 0.0, 0)
    model = copy.deepcopy(loaded.model)
    start = time.perf_counter()
    quantize_model(model, loaded.adapter, SIMULATED["W8A8 static per-tensor naive (sim)"], calib_batches=backend_calib)
    score("W8A8 static per-tensor naive (sim) [backend windows, quanto calib]", model, backend_plan,
          time.perf_counter() - start, len(backend_calib))
    del model
    for label, backend in BACKENDS.items():
        start = time.perf_counter()
        model = quantize_backend(loaded.model, backend, calib_batches=backend_calib)
        used = len(backend_calib) if backend == "quanto-w8a8" else 0
        score(label, model, backend_plan, time.perf_counter() - start, used, backend=backend)
        del model

    fp = {r["windows"]: r["ppl"] for r in rows if r["scheme"].startswith("fp32")}
    for row in rows:
        row["vs_fp32"] = row["ppl"] / fp[row["windows"]]
    sim_static = next(r for r in rows if "quanto calib" in r["scheme"])["ppl"]
    quanto = next(r for r in rows if r.get("backend") == "quanto-w8a8")["ppl"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    payload = {
        "command": command,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": library_versions(),
        "model": {"spec": loaded.spec, **loaded.source},
        "data": {"sha256": stream.text_sha256, **stream.source, **plan.describe(),
                 "backend_eval_windows": len(backend_plan.eval_windows), "backend_calib_windows": len(backend_calib)},
        "bos": "never",
        "rows": rows,
        "crosscheck": {"sim_static_w8a8": sim_static, "quanto_w8a8": quanto,
                       "relative_difference": abs(sim_static - quanto) / quanto},
    }
    lines = [
        "# Quantization table: SmolLM2-135M, WikiText-2 test",
        "",
        f"ctx {plan.ctx}, BOS never; calibration windows {plan.describe()['calib_range']} (disjoint from evaluation "
        f"{plan.describe()['eval_range']}). Backend rows: first {len(backend_plan.eval_windows)} window(s), "
        f"quanto calibrated on {len(backend_calib)} window(s); compare them with the fp32 row of the same windows.",
        "",
        "| scheme | ppl | x fp32 (same windows) | eval windows | calib windows | quantize s | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['scheme']} | {r['ppl']:.3f} | {r['vs_fp32']:.3f} | {r['windows']} | {r['calib_windows']} | "
          f"{r['quantize_s']} | {r['eval_s']} |" for r in rows),
        "",
        f"Cross-check, simulated vs quanto static per-tensor W8A8 on the same calibration: {sim_static:.3f} vs "
        f"{quanto:.3f} ({100 * payload['crosscheck']['relative_difference']:.1f}% apart).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {payload['machine']}  ",
        f"Versions: {payload['versions']}",
        "",
    ]
    table = "\n".join(lines)
    atomic_write_json(args.out.with_suffix(".json"), payload)
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
