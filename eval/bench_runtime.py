"""Runtime of real quantized models: prefill tokens/s, decode tokens/s, peak RSS and artifact bytes.

Prefill: one forward over a ctx-token window (batch 1). Decode: --new-tokens greedy steps of one token each
after a ctx-token prompt (batch 1, KV cache), timed without the prompt. Each variant runs in its own process
so that its peak RSS (ru_maxrss) is its own; artifact bytes are the files it saves (safetensors, tied
embeddings stored once). Variants:
  fp32                         the model as loaded
  native-w8a8-prefix-smooth-except   recipes/w8a8-prefix-smooth-except-native.yaml through the engine
                                     (fp prefix, smoothing, 8 exceptions, static per-tensor int8 activations)
  native-w8a16 / native-w4a16        recipes/w8a16-native.yaml / recipes/w4a16-group64-native.yaml
  torchao-int8dyn, quanto-w8a8, bnb-int8   peers (sinkquant.backends.peers)
The native rows are `apply_recipe` with the -native recipes (embedding and lm_head stored int8 per row),
calibrated on the recipe's windows from the end of the text (--calib-windows overrides their number); their
artifact is `sinkquant.engine.save`."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchlib import REPO, parser, setup, write_result
from transformers import Cache, DynamicCache

from sinkquant.backends.peers import quantize_backend, save_backend
from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine import apply_recipe, save
from sinkquant.recipe import load_recipe

NATIVE = {
    "native-w8a8-prefix-smooth-except": "recipes/w8a8-prefix-smooth-except-native.yaml",
    "native-w8a16": "recipes/w8a16-native.yaml",
    "native-w4a16": "recipes/w4a16-group64-native.yaml",
}
PEERS = ("torchao-int8dyn", "quanto-w8a8", "bnb-int8")
VARIANTS = ("fp32", *NATIVE, *PEERS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(variant: str, loaded, stream: TokenStream, ctx: int, calib_windows: int | None
          ) -> tuple[torch.nn.Module, Callable[[], Cache | None], list[int], int]:
    """The model, a maker of the KV cache each run starts from (the prefix's, or the int8 one), the prefix ids
    and the artifact bytes."""
    with tempfile.TemporaryDirectory(prefix="sinkquant-runtime-") as tmp:
        if variant == "fp32":
            loaded.model.save_pretrained(tmp)
            return loaded.model, lambda: None, [], folder_bytes(Path(tmp))
        if variant in PEERS:
            plan = plan_windows(stream, ctx=ctx, max_windows=1, calib_windows=calib_windows or 8)
            model = quantize_backend(loaded.model, variant, [stream.windows(ctx, [i]) for i in plan.calib_windows])
            save_backend(model, variant, Path(tmp) / "artifact")
            return model, lambda: None, [], folder_bytes(Path(tmp))
        recipe = load_recipe(REPO / NATIVE[variant])
        if calib_windows is not None:
            recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
                update={"windows": calib_windows})})
        quantized = apply_recipe(loaded, recipe, stream, ctx)
        save(quantized, Path(tmp) / "artifact")
        ids = quantized.prefix.ids if quantized.prefix is not None else []
        return quantized.model, lambda: quantized.cache_for_batch(1), ids, folder_bytes(Path(tmp))


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


@torch.no_grad()
def measure(model: torch.nn.Module, new_cache: Callable[[], Cache | None], window: torch.Tensor, new_tokens: int,
            repeats: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if window.is_cuda else (lambda: None)  # CUDA kernels run asynchronously
    prefill = []
    for _ in range(repeats):
        past = new_cache()
        sync()
        start = time.perf_counter()
        model(input_ids=window, past_key_values=past, use_cache=past is not None, logits_to_keep=1)
        sync()
        prefill.append(time.perf_counter() - start)
    decode = []
    for _ in range(repeats):
        past = new_cache() or DynamicCache(config=model.config)
        logits = model(input_ids=window, past_key_values=past, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(input_ids=token, past_key_values=past, use_cache=True).logits[:, -1:].argmax(-1)
        sync()
        decode.append(time.perf_counter() - start)
    ctx = window.shape[1]
    return {"prefill_tokens_per_s": ctx / statistics.median(prefill),
            "decode_tokens_per_s": new_tokens / statistics.median(decode)}


def child(args) -> None:
    loaded, stream = setup(args)
    loaded.model.to(args.device)  # the recipes quantize on the model's device
    plan = plan_windows(stream, ctx=args.ctx, max_windows=1)
    start = time.perf_counter()
    model, new_cache, prefix_ids, artifact = build(args.child, loaded, stream, args.ctx, args.calib_windows)
    build_seconds = time.perf_counter() - start
    window = stream.windows(args.ctx, [plan.eval_windows[0]]).to(args.device)
    result = measure(model.eval(), new_cache, window, args.new_tokens, args.repeats)
    result.update(artifact_bytes=artifact, build_seconds=build_seconds, weight_bytes=weight_bytes(model),
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  prefix_ids=prefix_ids, data_sha256=stream.text_sha256, eval_window=plan.eval_windows[0],
                  calib_windows=args.calib_windows, device=args.device,
                  peak_device_bytes=torch.cuda.max_memory_allocated() if window.is_cuda else None)
    print("RESULT " + json.dumps(result))


BEST_STATIC = "native-w8a8-prefix-smooth-except"
GOALS = {"prefill_tokens_per_s": 1.7, "decode_tokens_per_s": 1.5}  # x fp32, for the best static W8A8


def goal_checks(rows: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    """The best static W8A8 against fp32 (prefill and decode goals) and against every peer measured with it."""
    best, fp32 = rows.get(BEST_STATIC), rows.get("fp32")
    if best is None or fp32 is None:
        return []
    checks = [(best[key] >= goal * fp32[key], f"{BEST_STATIC} {key.split('_')[0]} {best[key] / fp32[key]:.2f}x fp32 "
               f"(goal >= {goal}x)") for key, goal in GOALS.items()]
    peers = {name: row for name, row in rows.items() if name in PEERS}
    if peers:
        fastest = max(peers, key=lambda name: peers[name]["prefill_tokens_per_s"])
        ratio = best["prefill_tokens_per_s"] / peers[fastest]["prefill_tokens_per_s"]
        checks.append((ratio > 1, f"{BEST_STATIC} prefill {ratio:.3f}x the fastest peer's ({fastest}; goal > 1)"))
    return checks


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
    p.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (default: each recipe's own, 8 for the peers)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (make gpu-check)")
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
        f"{args.repeats}; each variant in its own process. Native models: the -native recipes through "
        "apply_recipe (prefix, smoothing and exceptions included; embedding and lm_head stored int8 per row), "
        "quantized in place. "
        "Peak RSS includes the fp32 model each peer is built from in the same process; 'weights in memory' is the "
        "model alone.")
    checks = goal_checks(measured)
    if checks:
        body += "\n\nGoals (issue 12), this run:\n\n" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}"
                                                             for ok, text in checks)
    if measured:
        plot(measured, args.out)
    write_result(args.out, f"Runtime of real quantized models ({args.device.upper()})", body,
                 {"rows": rows, "ctx": args.ctx, "new_tokens": args.new_tokens, "repeats": args.repeats})


if __name__ == "__main__":
    main()
