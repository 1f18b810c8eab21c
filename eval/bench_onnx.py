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
--new-tokens greedy steps after a ctx-token prompt. ONNX rows run as sinkquant's ONNX generation does (`SharedKV`:
one KV buffer shared between past and present, the prompt in calls of PREFILL_CHUNK tokens); their prefill in one
call is shown beside it. Each round times every row once (interleaved), the median of
--repeats rounds is reported. The float-rounding spread of a static-int8 perplexity is shown as the native model in
float64 (the same integers in double precision): the export's goal is checked against it.

A value within float rounding of a grid boundary lands one level apart in two runtimes and the difference travels, so
one run of each cannot settle a 0.3% goal. `--jitter N` evaluates the native backend and the export N more times,
realization k multiplying the prefix KV by (1 + 1e-7 N(0, 1)) drawn from seed k, the same draws for both (the past
is a graph input, so the exported graph is the one shipped; the embedding output that bench_faithful.py jitters is
inside the graph, behind input_ids). The goal is then checked on the mean of the paired differences (export vs
native, realization by realization) with its standard error, in place of the float64 run."""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_faithful import JITTER
from bench_runtime import measure
from benchlib import REPO, parser, setup, write_result

from sinkquant.backends import ONNX_PEERS
from sinkquant.backends.export import export
from sinkquant.backends.export.onnx import MODEL_FILE
from sinkquant.backends.export.onnx_peers import (
    kernel_counts,
    onnx_model,
    peer_label,
    quantize_peer,
    write_fp32_graph,
)
from sinkquant.backends.export.onnx_runtime import (
    PREFILL_CHUNK,
    OnnxCausalLM,
    SharedKV,
    load_onnx,
    past_length,
    prefix_arrays,
)
from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.engine import QuantizedModel, apply_recipe
from sinkquant.models import LoadedModel
from sinkquant.perplexity import Prefix, evaluate
from sinkquant.recipe import load_recipe
from sinkquant.tables import markdown_table

RECIPE = "recipes/w8a8-prefix-smooth-except-native.yaml"
GOAL_PPL = 0.3  # percent, against the native backend
GOAL_PREFILL_TORCH, GOAL_PREFILL_ORT, GOAL_DECODE_ORT = 2.5, 1.6, 1.5
ORT_FP32, OURS = "ONNX Runtime fp32", "sinkquant ONNX (ONNX Runtime)"
VERDICTS = {True: "PASS", False: "MISS", None: "INFO"}


def onnx_speed(model: OnnxCausalLM, window: np.ndarray, past: dict | None, new_tokens: int
               ) -> dict[str, float]:
    """Seconds of a prefill of `window` after `past` (the last position's logits) in one call and in SharedKV's
    prompt chunks, and of `new_tokens` greedy decode steps after the chunked one, through one KV buffer shared
    between past and present (`SharedKV`, as sinkquant's ONNX generation runs), after one untimed prefill."""
    length = past_length(past) + window.shape[1] + new_tokens
    # untimed: the first call after another session's ran ~35% slower (measured at ctx 128, the export), and would
    # land on whichever phase comes first
    SharedKV(model, length, past, prefill_chunk=None).next_logits(window)
    seconds = {}
    for phase, chunk in (("prefill_one_call", None), ("prefill", PREFILL_CHUNK)):
        kv = SharedKV(model, length, past, prefill_chunk=chunk)
        start = time.perf_counter()
        token = int(kv.next_logits(window).argmax())
        seconds[phase] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(kv.next_logits(np.asarray([[token]], np.int64)).argmax())
    seconds["decode"] = time.perf_counter() - start
    return seconds


def jittered_prefix(prefix: Prefix, seed: int) -> Prefix:
    """A copy of `prefix` whose keys and values are multiplied by (1 + JITTER * N(0, 1)), drawn from `seed` layer by
    layer, keys before values: equal prefixes give equal draws, whichever runtime reads them."""
    cache = copy.deepcopy(prefix.cache)
    generator = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            tensor.mul_(1 + JITTER * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    return Prefix(ids=list(prefix.ids), cache=cache)


def jitter_runs(quantized: QuantizedModel, exported: LoadedModel, prefix: Prefix, stream: TokenStream,
                plan: WindowPlan, realizations: int) -> dict[str, Any]:
    """Native and export perplexity under realizations 1..N of the prefix-KV jitter, and their paired difference."""
    native, onnx, start = [], [], time.perf_counter()
    for seed in range(1, realizations + 1):
        jittered = dataclasses.replace(quantized, prefix=jittered_prefix(quantized.prefix, seed))
        native.append(jittered.evaluate(stream, plan, bos="never", progress=False).ppl)
        onnx.append(evaluate(exported, stream, plan, bos="never", prefix=jittered_prefix(prefix, seed),
                             progress=False).ppl)
        print(f"jitter {seed}: native {native[-1]:.4f}, ONNX export {onnx[-1]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    diffs = [100 * (o / n - 1) for n, o in zip(native, onnx, strict=True)]
    return {"relative": JITTER, "seeds": list(range(1, realizations + 1)), "native": native, "onnx": onnx,
            "diff_pct": diffs, "native_mean": statistics.fmean(native), "onnx_mean": statistics.fmean(onnx),
            "mean_diff_pct": statistics.fmean(diffs),
            "std_error_pct": statistics.stdev(diffs) / math.sqrt(len(diffs))}


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
    p.add_argument("--jitter", type=int, default=0,
                   help="prefix-KV jitter realizations of native and export (0: one run each, float64 as spread)")
    p.set_defaults(threads=2)
    args = p.parse_args()
    if args.jitter == 1 or args.jitter < 0:
        p.error(f"--jitter {args.jitter} is not valid; valid: 0 (off) or 2 or more realizations (a standard error)")
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
        if args.jitter and (prefix is None or quantized.prefix is None):
            p.error(f"--jitter jitters the prefix KV; {args.recipe.name} has no prefix")
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

        rows["torch fp32"] = {"ppl": evaluate(loaded, stream, plan, bos="never", progress=False).ppl}
        rows["sinkquant native (torch)"] = {"ppl": quantized.evaluate(stream, plan, bos="never", progress=False).ppl}
        if not args.jitter:
            rows["sinkquant native (torch)"]["ppl_float64"] = evaluate(
                loaded, stream, plan, prefix=quantized.prefix, model=copy.deepcopy(quantized.model).double(),
                progress=False).ppl
        for name in list(onnx_rows):
            # Without speed rounds a session is let go once measured: gemma3-270m's fp32 and int8 sessions beside
            # the torch models passed 7.8 GB.
            model, row_prefix, path = onnx_rows[name] if args.repeats or name == OURS else onnx_rows.pop(name)
            rows[name] = {"ppl": evaluate(model, stream, plan, bos="never", prefix=row_prefix, progress=False).ppl,
                          "kernels": kernel_counts(path, args.threads), **quantizing.get(name, {})}
            print(f"{name}: perplexity {rows[name]['ppl']:.4f}", flush=True)
            del model
        jitter = jitter_runs(quantized, exported, prefix, stream, plan, args.jitter) if args.jitter else None

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
                speed = onnx_speed(model.model, window.numpy(), prefix_arrays(row_prefix), args.new_tokens)
                for phase, seconds in speed.items():
                    timings[name].setdefault(phase, []).append(seconds)
        for name, times in timings.items() if args.repeats else ():
            rows[name]["seconds_per_round"] = times
            rows[name]["prefill_tokens_per_s"] = args.ctx / statistics.median(times["prefill"])
            rows[name]["decode_tokens_per_s"] = args.new_tokens / statistics.median(times["decode"])
            if "prefill_one_call" in times:
                rows[name]["prefill_one_call_tokens_per_s"] = args.ctx / statistics.median(times["prefill_one_call"])
    report(args, rows, plan, stream, len(calibration), jitter)


def perplexity_check(rows: dict[str, dict[str, Any]], jitter: dict[str, Any] | None) -> tuple[bool, str]:
    """The export's perplexity goal: on one run each against the float64 spread, or on the jittered pairs."""
    native, ours = rows["sinkquant native (torch)"], rows[OURS]
    vs_native = 100 * (ours["ppl"] / native["ppl"] - 1)
    if jitter is None:
        vs_native64 = 100 * (ours["ppl"] / native["ppl_float64"] - 1)
        native_spread = 100 * (native["ppl_float64"] / native["ppl"] - 1)
        return (abs(vs_native64) <= GOAL_PPL or abs(vs_native) <= GOAL_PPL,
                f"perplexity: ONNX export vs native {vs_native:+.2f}%, vs native in float64 {vs_native64:+.2f}% "
                f"(native float32 vs float64: {native_spread:+.2f}%, the float-rounding spread); goal within "
                f"{GOAL_PPL}%")
    mean, error = jitter["mean_diff_pct"], jitter["std_error_pct"]
    zero = "yes" if abs(mean) > 2 * error else "no"
    return (abs(mean) <= GOAL_PPL,
            f"perplexity: ONNX export vs native, paired over {len(jitter['diff_pct'])} prefix-KV jitter "
            f"realizations: {mean:+.2f}% ± {error:.2f}% (mean ± std. error; unjittered run {vs_native:+.2f}%); "
            f"PASS when |mean| <= {GOAL_PPL}%; distinguishable from zero (|mean| > 2 std. errors): {zero}")


def jitter_table(jitter: dict[str, Any]) -> str:
    table = [[str(seed), f"{n:.4f}", f"{o:.4f}", f"{d:+.3f}%"]
             for seed, n, o, d in zip(jitter["seeds"], jitter["native"], jitter["onnx"], jitter["diff_pct"],
                                      strict=True)]
    table.append(["mean", f"{jitter['native_mean']:.4f}", f"{jitter['onnx_mean']:.4f}",
                  f"{jitter['mean_diff_pct']:+.3f}% ± {jitter['std_error_pct']:.3f}%"])
    return (f"\n\nJitter realizations (prefix KV times 1 + {JITTER:g} N(0, 1), seed k, the same draws for both; "
            "difference: export vs native in the same realization, mean ± std. error of the differences):\n\n"
            + markdown_table(["realization", "native (torch)", "ONNX export (ONNX Runtime)", "export vs native"],
                             table))


def speed_check(ours: dict[str, Any], other: dict[str, Any], phase: str, name: str, goal: float | None
                ) -> tuple[bool | None, str]:
    """The export's speed over `other`'s in `phase`: the median of the per-round ratios (each round times every row
    once, so a ratio pairs times seconds apart on a machine whose speed drifts), with their range."""
    ratios = sorted(o / e for o, e in zip(other["seconds_per_round"][phase], ours["seconds_per_round"][phase],
                                          strict=True))
    median = statistics.median(ratios)
    text = (f"{phase.replace('_', ' ')}: ONNX export {median:.2f}x {name} (median of {len(ratios)} rounds' ratios, "
            f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    return (None, text) if goal is None else (median >= goal, f"{text}; goal {goal}x")


def report(args, rows: dict[str, dict[str, Any]], plan, stream: TokenStream, peer_calib: int,
           jitter: dict[str, Any] | None) -> None:
    fp32, ort32 = rows["torch fp32"], rows[ORT_FP32]
    ours = rows[OURS]
    table = []
    for name, row in rows.items():
        table.append([name, f"{row['ppl']:.4f}", f"{100 * (row['ppl'] / fp32['ppl'] - 1):+.1f}%",
                      f"{row.get('prefill_tokens_per_s', float('nan')):.0f}",
                      f"{row['prefill_one_call_tokens_per_s']:.0f}" if "prefill_one_call_tokens_per_s" in row else "",
                      f"{row.get('decode_tokens_per_s', float('nan')):.1f}",
                      ", ".join(f"{op} {n}" for op, n in row.get("kernels", {}).items()) or "torch"])
    checks = [perplexity_check(rows, jitter)]
    if args.repeats:
        checks += [speed_check(ours, fp32, "prefill", "torch fp32", GOAL_PREFILL_TORCH),
                   speed_check(ours, ort32, "prefill", "ORT fp32", GOAL_PREFILL_ORT),
                   speed_check(ours, ort32, "prefill_one_call", "ORT fp32", None),
                   speed_check(ours, ort32, "decode", "ORT fp32", GOAL_DECODE_ORT)]
    body = (f"{args.model}, WikiText-2 test, ctx {args.ctx}, first {len(plan.eval_windows)} windows, no BOS (the "
            f"sinkquant rows bring their fp prefix); calibration: the recipe's {len(plan.calib_windows)} windows from "
            f"the end of the text for the sinkquant rows, the first {peer_calib} of them for ONNX Runtime's static "
            f"rows (read one window at a time). Speed: batch 1, prefill of {args.ctx} tokens (last "
            f"logits; ONNX rows in calls of {PREFILL_CHUNK} tokens as sinkquant's ONNX generation runs it, and in "
            f"one call), decode of {args.new_tokens} tokens after it (ONNX rows: one KV buffer for past and "
            f"present), {args.threads} threads for torch and ONNX "
            f"Runtime, median of {args.repeats} interleaved rounds on a machine shared with other jobs (ratios "
            "between rows of one run are what counts; not measured: nan, with --repeats 0).\n\n"
            + markdown_table(["row", "perplexity", "vs fp32", "prefill tok/s", "prefill tok/s, one call",
                              "decode tok/s", "ONNX Runtime kernels (optimized graph)"], table)
            + (jitter_table(jitter) if jitter else "")
            + "\n\n" + "\n".join(f"- {VERDICTS[ok]}: {text}" for ok, text in checks))
    write_result(args.out, "ONNX Runtime: sinkquant's export and ONNX Runtime's own int8", body,
                 {"rows": rows, "jitter": jitter, "checks": [{"ok": ok, "text": text} for ok, text in checks],
                  "data": {"sha256": stream.text_sha256, **plan.describe()}})


if __name__ == "__main__":
    main()
