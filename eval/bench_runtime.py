"""Runtime of real quantized models: prefill tokens/s, decode tokens/s, peak RSS and artifact bytes.

Prefill: one forward over a ctx-token window (batch 1). Decode: --new-tokens greedy steps of one token each
after a ctx-token prompt (batch 1, KV cache), timed without the prompt. Each variant runs in its own process
so that its peak RSS (ru_maxrss) is its own; artifact bytes are the files it saves (safetensors, tied
embeddings stored once). Variants:
  fp32                         the model as loaded
  native-w8a8-static-prefix    native backend: int8 per-channel weights (RTN), static per-tensor int8
                               activations (absmax over --calib-windows windows), BOS as an fp prefix KV
  native-w8a16 / native-w4a16  native backend: int8 per-channel / int4 group-64 symmetric weights
  torchao-int8dyn, quanto-w8a8, bnb-int8   peers (sinkquant.quant.backends)
Until the engine is connected, the native models are built from the simulator (RTN + absmax calibration),
not from a recipe: no smoothing or exceptions."""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import REPO, parser, setup, write_result
from safetensors.torch import save_model
from transformers import DynamicCache

from sinkquant.adapters import adapter_for
from sinkquant.backends.native import native_from_simulated
from sinkquant.data import plan_windows
from sinkquant.perplexity import Prefix, build_prefix
from sinkquant.quant.backends import quantize_backend, save_backend
from sinkquant.quant.scheme import ActivationSpec, KeepPolicy, QuantScheme, WeightSpec
from sinkquant.quant.simulate import quantize_model

NATIVE = {
    "native-w8a8-static-prefix": QuantScheme(weights=WeightSpec(8, "channel"),
                                             activations=ActivationSpec(8, "static", symmetric=True),
                                             keep=KeepPolicy(positions=(0,))),
    "native-w8a16": QuantScheme(weights=WeightSpec(8, "channel")),
    "native-w4a16": QuantScheme(weights=WeightSpec(4, "group", 64, symmetric=True)),
}
PEERS = ("torchao-int8dyn", "quanto-w8a8", "bnb-int8")
VARIANTS = ("fp32", *NATIVE, *PEERS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(variant: str, loaded, calib: list[torch.Tensor]) -> tuple[torch.nn.Module, Prefix | None, int]:
    """The model, its prefix (or None) and its artifact bytes."""
    prefix = build_prefix(loaded.model, [loaded.bos_id]) if variant.endswith("-prefix") else None
    with tempfile.TemporaryDirectory(prefix="sinkquant-runtime-") as tmp:
        if variant == "fp32":
            loaded.model.save_pretrained(tmp)
            return loaded.model, None, folder_bytes(Path(tmp))
        if variant in PEERS:
            model = quantize_backend(loaded.model, variant, calib)
            save_backend(model, variant, Path(tmp) / "artifact")
            return model, None, folder_bytes(Path(tmp))
        model = copy.deepcopy(loaded.model)
        batches = calib if prefix is None else [
            {"input_ids": c, "past_key_values": prefix.cache_for_batch(1), "use_cache": True} for c in calib]
        scheme = NATIVE[variant]
        quantize_model(model, adapter_for(model), scheme, batches if scheme.needs_calibration else None)
        native_from_simulated(model, loaded.model)
        save_model(model, str(Path(tmp) / "model.safetensors"))
        return model, prefix, folder_bytes(Path(tmp))


def tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """Bytes behind a tensor, unwrapping tensor subclasses (torchao, quanto) into their inner tensors; shared
    storages (tied embeddings) count once."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name), seen) for name in names)
    storage = tensor.untyped_storage()
    if storage.data_ptr() in seen:
        return 0
    seen.add(storage.data_ptr())
    return storage.nbytes()


def weight_bytes(model: torch.nn.Module) -> int:
    """What the model's weights occupy in memory (parameters and buffers, kernel layouts included)."""
    seen: set[int] = set()
    return sum(tensor_bytes(t, seen) for t in [*model.parameters(), *model.buffers()])


def cache_for(prefix: Prefix | None) -> DynamicCache | None:
    return None if prefix is None else prefix.cache_for_batch(1)


@torch.no_grad()
def measure(model: torch.nn.Module, prefix: Prefix | None, window: torch.Tensor, new_tokens: int,
            repeats: int) -> dict[str, float]:
    prefill = []
    for _ in range(repeats):
        past = cache_for(prefix)
        start = time.perf_counter()
        model(input_ids=window, past_key_values=past, use_cache=past is not None, logits_to_keep=1)
        prefill.append(time.perf_counter() - start)
    decode = []
    for _ in range(repeats):
        past = cache_for(prefix) or DynamicCache(config=model.config)
        logits = model(input_ids=window, past_key_values=past, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, past_key_values=past, use_cache=True).logits[:, -1:].argmax(-1)
        decode.append(time.perf_counter() - start)
    ctx = window.shape[1]
    return {"prefill_tokens_per_s": ctx / statistics.median(prefill),
            "decode_tokens_per_s": new_tokens / statistics.median(decode)}


def child(args) -> None:
    loaded, stream = setup(args)
    plan = plan_windows(stream, ctx=args.ctx, max_windows=1, calib_windows=args.calib_windows)
    calib = [stream.windows(args.ctx, [i]) for i in plan.calib_windows]
    start = time.perf_counter()
    model, prefix, artifact = build(args.child, loaded, calib)
    build_seconds = time.perf_counter() - start
    window = stream.windows(args.ctx, [plan.eval_windows[0]])
    result = measure(model.eval(), prefix, window, args.new_tokens, args.repeats)
    result.update(artifact_bytes=artifact, build_seconds=build_seconds, weight_bytes=weight_bytes(model),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  prefix_ids=prefix.ids if prefix else [], data_sha256=stream.text_sha256,
                  eval_window=plan.eval_windows[0], calib_windows=list(plan.calib_windows))
    print("RESULT " + json.dumps(result))


def vs_fp32(row: dict[str, Any], fp32: dict[str, Any] | None, key: str) -> str:
    return f"{row[key] / fp32[key]:.2f}x" if fp32 else "-"


def plot(rows: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fp32 = rows.get("fp32")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "prefill_tokens_per_s", "prefill tokens/s"),
                             (axes[1], "decode_tokens_per_s", "decode tokens/s")):
        values = [rows[n][key] / (fp32[key] if fp32 else 1.0) for n in names]
        axis.barh(names, values)
        axis.axvline(1.0, color="grey", linewidth=0.8)
        axis.set_title(f"{title}{' vs fp32' if fp32 else ''}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = parser(__doc__, windows=1, out="eval/results/runtime")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--calib-windows", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows: dict[str, dict[str, Any]] = {}
    forwarded = list(sys.argv[1:])
    for variant in args.variants:
        command = [sys.executable, __file__, *forwarded, "--child", variant]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            print(f"{variant}: failed ({tail[0]})")
            rows[variant] = {"error": tail[0]}
            continue
        rows[variant] = json.loads(lines[-1].removeprefix("RESULT "))
        print(variant, rows[variant])
    measured = {n: r for n, r in rows.items() if "error" not in r}
    fp32 = measured.get("fp32")
    lines = ["| variant | prefill tok/s | vs fp32 | decode tok/s | vs fp32 | peak RSS MiB | weights in memory MB | "
             "artifact MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {row['prefill_tokens_per_s']:.1f} | {vs_fp32(row, fp32, 'prefill_tokens_per_s')} | "
                     f"{row['decode_tokens_per_s']:.1f} | {vs_fp32(row, fp32, 'decode_tokens_per_s')} | "
                     f"{row['peak_rss_bytes'] / 2**20:.0f} | {row['weight_bytes'] / 1e6:.1f} | "
                     f"{row['artifact_bytes'] / 1e6:.1f} |")
    body = "\n".join(lines) + (
        f"\n\nctx {args.ctx}, batch 1, decode {args.new_tokens} tokens after the ctx-token prompt, median of "
        f"{args.repeats}; each variant in its own process. Native models: RTN weights + absmax static scales on "
        f"{args.calib_windows} calibration windows (no smoothing, no exceptions). Peak RSS includes the fp32 model "
        "every quantized variant is built from in the same process; 'weights in memory' is the model alone.")
    if measured:
        plot(measured, args.out)
    write_result(args.out, "Runtime of real quantized models (CPU)", body,
                 {"rows": rows, "ctx": args.ctx, "new_tokens": args.new_tokens, "repeats": args.repeats})


if __name__ == "__main__":
    main()
