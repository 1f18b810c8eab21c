"""sinkquant's ONNX export against ONNX Runtime's own int8 quantization: perplexity and tokens/s, same runtime, same
windows, one interleaved run.

    python eval/bench_onnx.py                      # SmolLM2, WikiText-2, ctx 512, first 8 windows, 2 threads
    python eval/bench_onnx.py --model gemma3-270m --peers '' --out eval/results/onnx-gemma3-270m

Rows: torch fp32; ONNX Runtime fp32 (the fp32 graph of the same exporter); ONNX Runtime's quantize_static (QDQ,
per-channel int8 weights, uint8 per-tensor activations; MinMax, Percentile, Entropy) and quantize_dynamic on that
fp32 graph (sinkquant.backends.export.onnx_peers, as `sinkquant compare --onnx-peers` runs them), calibrated on the
recipe's windows from the end of the text, one window at a time (no prefix: ONNX Runtime has none); the native
backend (torch) and its ONNX export (recipes/w8a8-prefix-smooth-except-native.yaml) run by ONNX Runtime with
the fp prefix KV as the first past. Prefill: one ctx-token window, batch 1, logits of the last position; decode:
--new-tokens greedy steps after a ctx-token prompt. Each round times every row once (interleaved), the median of
--repeats rounds is reported. The float-rounding spread of a static-int8 perplexity is shown as the native model in
float64 (the same integers in double precision): the export's goal is checked against it."""

from __future__ import annotations

import copy
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_runtime import measure
from benchlib import REPO, parser, setup, write_result

from sinkquant.backends import ONNX_PEERS
from sinkquant.backends.export import export
from sinkquant.backends.export.onnx import MODEL_FILE, past_names
from sinkquant.backends.export.onnx_peers import (
    kernel_counts,
    onnx_model,
    peer_label,
    quantize_peer,
    write_fp32_graph,
)
from sinkquant.backends.export.onnx_runtime import OnnxCausalLM, load_onnx
from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine import apply_recipe
from sinkquant.models import LoadedModel
from sinkquant.perplexity import Prefix, evaluate
from sinkquant.recipe import load_recipe
from sinkquant.tables import markdown_table

RECIPE = "recipes/w8a8-prefix-smooth-except-native.yaml"
GOAL_PPL = 0.3  # percent, against the native backend
GOAL_PREFILL_TORCH, GOAL_PREFILL_ORT, GOAL_DECODE_ORT = 2.5, 1.6, 1.5
ORT_FP32, OURS = "ONNX Runtime fp32", "sinkquant ONNX (ONNX Runtime)"


def onnx_prefill(model: OnnxCausalLM, window: np.ndarray, past: dict | None) -> float:
    start = time.perf_counter()
    model.run(window, past, logits_to_keep=1)
    return time.perf_counter() - start


def onnx_decode(model: OnnxCausalLM, window: np.ndarray, past: dict | None, new_tokens: int) -> float:
    logits, past = model.run(window, past, logits_to_keep=1)
    token = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, past = model.run(token, past, logits_to_keep=1)
        token = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
    return time.perf_counter() - start


def prefix_past(prefix: Prefix | None) -> dict[str, np.ndarray] | None:
    if prefix is None:
        return None
    past = {}
    for index, layer in enumerate(prefix.cache.layers):
        key, value = past_names(index)
        past[key], past[value] = layer.keys.numpy(), layer.values.numpy()
    return past


def main() -> None:
    p = parser(__doc__, windows=8, out="eval/results/onnx")
    p.add_argument("--recipe", type=Path, default=REPO / RECIPE)
    p.add_argument("--peers", default=",".join(ONNX_PEERS),
                   help=f"ONNX Runtime quantizations to add, comma-separated, of {', '.join(ONNX_PEERS)}")
    p.add_argument("--repeats", type=int, default=3, help="speed rounds; 0: perplexity only")
    p.add_argument("--peer-calib-windows", type=int, default=None,
                   help="calibrate ONNX Runtime's static peers on only the first N of the recipe's calibration "
                        "windows (default: all)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.set_defaults(threads=2)
    args = p.parse_args()
    loaded, stream = setup(args)
    recipe = load_recipe(args.recipe)
    plan = plan_windows(stream, ctx=args.ctx, max_windows=args.windows, calib_windows=recipe.calibration.windows)
    calibration = [stream.windows(args.ctx, [i]) for i in plan.calib_windows][:args.peer_calib_windows]
    peers = [p for p in args.peers.split(",") if p]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sinkquant-bench-onnx-") as tmp_name:
        tmp = Path(tmp_name)
        fp32_path = write_fp32_graph(loaded.model, tmp / "fp32")
        start = time.perf_counter()
        quantized = apply_recipe(loaded, recipe, stream, args.ctx, copy=True)
        folder = export(quantized, tmp / "sinkquant", format="onnx")
        print(f"quantized and exported in {time.perf_counter() - start:.0f} s")
        exported, prefix, _ = load_onnx(folder, threads=args.threads)
        onnx_rows: dict[str, tuple[LoadedModel, Prefix | None, Path]] = {
            ORT_FP32: (onnx_model(loaded, fp32_path, args.threads), None, fp32_path)}
        quantizing: dict[str, dict[str, float]] = {}  # per peer: seconds, and the process's peak memory after it
        for peer in peers:
            start = time.perf_counter()
            path = quantize_peer(peer, fp32_path, tmp / peer, calibration, onnx_rows[ORT_FP32][0].model)
            quantizing[peer_label(peer)] = {"quantize_seconds": time.perf_counter() - start,
                                            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            print(f"{peer_label(peer)}: {quantizing[peer_label(peer)]}", flush=True)
            onnx_rows[peer_label(peer)] = (onnx_model(loaded, path, args.threads), None, path)
        onnx_rows[OURS] = (exported, prefix, folder / MODEL_FILE)

        native_f32 = quantized.evaluate(stream, plan, bos="never", progress=False).ppl
        native_f64 = evaluate(loaded, stream, plan, prefix=quantized.prefix,
                              model=copy.deepcopy(quantized.model).double(), progress=False).ppl
        rows["torch fp32"] = {"ppl": evaluate(loaded, stream, plan, bos="never", progress=False).ppl}
        rows["sinkquant native (torch)"] = {"ppl": native_f32, "ppl_float64": native_f64}
        for name, (model, row_prefix, path) in onnx_rows.items():
            rows[name] = {"ppl": evaluate(model, stream, plan, bos="never", prefix=row_prefix, progress=False).ppl,
                          "kernels": kernel_counts(path, args.threads), **quantizing.get(name, {})}
            print(f"{name}: perplexity {rows[name]['ppl']:.4f}", flush=True)

        window = stream.windows(args.ctx, [plan.eval_windows[0]])
        timings: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in rows}
        torch_rows = {"torch fp32": (loaded.model, lambda: None),
                      "sinkquant native (torch)": (quantized.model, lambda: quantized.cache_for_batch(1))}
        for _ in range(args.repeats):
            for name, (model, new_cache) in torch_rows.items():
                speed = measure(model, new_cache, window, args.new_tokens, repeats=1)
                timings[name]["prefill"].append(args.ctx / speed["prefill_tokens_per_s"])
                timings[name]["decode"].append(args.new_tokens / speed["decode_tokens_per_s"])
            for name, (model, row_prefix, _) in onnx_rows.items():
                past = prefix_past(row_prefix)
                timings[name]["prefill"].append(onnx_prefill(model.model, window.numpy(), past))
                timings[name]["decode"].append(onnx_decode(model.model, window.numpy(), past, args.new_tokens))
        for name, times in timings.items() if args.repeats else ():
            rows[name]["prefill_tokens_per_s"] = args.ctx / statistics.median(times["prefill"])
            rows[name]["decode_tokens_per_s"] = args.new_tokens / statistics.median(times["decode"])
    report(args, rows, plan, stream, len(calibration))


def report(args, rows: dict[str, dict[str, Any]], plan, stream: TokenStream, peer_calib: int) -> None:
    fp32, ort32 = rows["torch fp32"], rows[ORT_FP32]
    native, ours = rows["sinkquant native (torch)"], rows[OURS]
    table = []
    for name, row in rows.items():
        table.append([name, f"{row['ppl']:.4f}", f"{100 * (row['ppl'] / fp32['ppl'] - 1):+.1f}%",
                      f"{row.get('prefill_tokens_per_s', float('nan')):.0f}",
                      f"{row.get('decode_tokens_per_s', float('nan')):.1f}",
                      ", ".join(f"{op} {n}" for op, n in row.get("kernels", {}).items()) or "torch"])
    vs_native = 100 * (ours["ppl"] / native["ppl"] - 1)
    vs_native64 = 100 * (ours["ppl"] / native["ppl_float64"] - 1)
    native_spread = 100 * (native["ppl_float64"] / native["ppl"] - 1)
    checks = [
        (abs(vs_native64) <= GOAL_PPL or abs(vs_native) <= GOAL_PPL,
         f"perplexity: ONNX export vs native {vs_native:+.2f}%, vs native in float64 {vs_native64:+.2f}% (native "
         f"float32 vs float64: {native_spread:+.2f}%, the float-rounding spread); goal within {GOAL_PPL}%"),
    ]
    checks += [] if not args.repeats else [
        (ours["prefill_tokens_per_s"] >= GOAL_PREFILL_TORCH * fp32["prefill_tokens_per_s"],
         f"prefill: ONNX export {ours['prefill_tokens_per_s'] / fp32['prefill_tokens_per_s']:.2f}x torch fp32 "
         f"(goal {GOAL_PREFILL_TORCH}x)"),
        (ours["prefill_tokens_per_s"] >= GOAL_PREFILL_ORT * ort32["prefill_tokens_per_s"],
         f"prefill: ONNX export {ours['prefill_tokens_per_s'] / ort32['prefill_tokens_per_s']:.2f}x ORT fp32 "
         f"(goal {GOAL_PREFILL_ORT}x)"),
        (ours["decode_tokens_per_s"] >= GOAL_DECODE_ORT * ort32["decode_tokens_per_s"],
         f"decode: ONNX export {ours['decode_tokens_per_s'] / ort32['decode_tokens_per_s']:.2f}x ORT fp32 "
         f"(goal {GOAL_DECODE_ORT}x)"),
    ]
    body = (f"{args.model}, WikiText-2 test, ctx {args.ctx}, first {len(plan.eval_windows)} windows, no BOS (the "
            f"sinkquant rows bring their fp prefix); calibration: the recipe's {len(plan.calib_windows)} windows from "
            f"the end of the text for the sinkquant rows, the first {peer_calib} of them for ONNX Runtime's static "
            f"rows (read one window at a time). Speed: batch 1, prefill of {args.ctx} tokens (last "
            f"logits), decode of {args.new_tokens} tokens after it, {args.threads} threads for torch and ONNX "
            f"Runtime, median of {args.repeats} interleaved rounds on a machine shared with other jobs (ratios "
            "between rows of one run are what counts; not measured: nan, with --repeats 0).\n\n"
            + markdown_table(["row", "perplexity", "vs fp32", "prefill tok/s", "decode tok/s",
                              "ONNX Runtime kernels (optimized graph)"], table)
            + "\n\n" + "\n".join(f"- {'PASS' if ok else 'MISS'}: {text}" for ok, text in checks))
    write_result(args.out, "ONNX Runtime: sinkquant's export and ONNX Runtime's own int8", body,
                 {"rows": rows, "checks": [{"ok": ok, "text": text} for ok, text in checks],
                  "data": {"sha256": stream.text_sha256, **plan.describe()}})


if __name__ == "__main__":
    main()
