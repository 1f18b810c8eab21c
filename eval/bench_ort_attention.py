"""Where ONNX Runtime spends an exported model's time, and how its CPU attention kernels compare with torch's.

Two measurements, one run:

1. Attention alone at the model's shape (heads, kv heads, head dim from its config), a causal prefill of --ctx
   tokens after a 1-token past (the prefix): ONNX Runtime's GroupQueryAttention (what the export uses),
   MultiHeadAttention and the standard Attention (opset 23), each a one-node graph, against torch's
   scaled_dot_product_attention, interleaved rounds, median.
2. With --export FOLDER: ONNX Runtime's own profiler over a prefill of --ctx tokens and over --new-tokens decode
   steps after it, run as sinkquant's ONNX generation runs them (`SharedKV`), time per op type of the optimized
   graph. The export of eval/results/ort-attention.md:

       sinkquant quantize --recipe recipes/w8a8-prefix-smooth-except-native.yaml --out out/w8a8
       sinkquant export out/w8a8 --format onnx --out out/w8a8-onnx

Together they say how much of the export's speed the attention kernel decides, which no quantization changes.
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from bench_runtime import measure
from benchlib import REPO, configure, parser, write_result
from onnx import TensorProto, helper

from sinkquant.backends.export.onnx import MODEL_FILE
from sinkquant.backends.export.onnx_peers import write_fp32_graph
from sinkquant.backends.export.onnx_runtime import (
    PREFILL_CHUNK,
    OnnxCausalLM,
    SharedKV,
    load_onnx,
    past_length,
    prefix_arrays,
    session_options,
)
from sinkquant.models import load_model

# the IR version the pinned onnxruntime reads (onnx writes a newer one by default)
IR_VERSION = 10


def one_node_session(node: onnx.NodeProto, inputs: dict[str, np.ndarray], outputs: list[str], opset: int,
                     threads: int | None) -> Any:
    values = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
              for n, a in inputs.items()]
    graph = helper.make_graph([node], "attention", values,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = IR_VERSION
    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def attention_kernels(config: Any, ctx: int, threads: int | None) -> dict[str, Callable[[], object]]:
    """One callable per kernel, each computing the same causal attention of `ctx` queries over 1 + `ctx` keys."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, ctx, heads * dim), dtype=np.float32)
    k, v = (rng.standard_normal((1, ctx, kv_heads * dim), dtype=np.float32) for _ in range(2))
    past_k, past_v = (rng.standard_normal((1, kv_heads, 1, dim), dtype=np.float32) for _ in range(2))
    scale = dim ** -0.5

    def heads_first(x: np.ndarray, n: int) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(1, ctx, n, dim).transpose(0, 2, 1, 3))

    keys = np.concatenate([past_k, heads_first(k, kv_heads)], axis=2)
    values = np.concatenate([past_v, heads_first(v, kv_heads)], axis=2)
    gqa_in = {"q": q, "k": k, "v": v, "past_k": past_k, "past_v": past_v,
              "seqlens_k": np.array([ctx], np.int32), "total": np.array(ctx + 1, np.int32)}
    gqa = one_node_session(helper.make_node(
        "GroupQueryAttention", list(gqa_in), ["out", "present_k", "present_v"], domain="com.microsoft",
        num_heads=heads, kv_num_heads=kv_heads, scale=scale), gqa_in, ["out", "present_k", "present_v"], 21, threads)
    repeat = heads // kv_heads
    mha_in = {"q": q, "k": np.repeat(keys, repeat, axis=1), "v": np.repeat(values, repeat, axis=1)}
    mha = one_node_session(helper.make_node("MultiHeadAttention", list(mha_in), ["out"], domain="com.microsoft",
                                            num_heads=heads, scale=scale, unidirectional=1),
                           mha_in, ["out"], 21, threads)
    # opset 23 Attention: is_causal aligns the mask to the top left, so the past key is left out here
    std_in = {"q": heads_first(q, heads), "k": heads_first(k, kv_heads), "v": heads_first(v, kv_heads)}
    std = one_node_session(helper.make_node("Attention", list(std_in), ["out"], is_causal=1, scale=scale),
                           std_in, ["out"], 23, threads)
    tq = torch.from_numpy(std_in["q"])
    tk, tv = (torch.from_numpy(x).repeat_interleave(repeat, dim=1) for x in (keys, values))
    mask = torch.ones(ctx, ctx + 1, dtype=torch.bool).tril(1)
    return {
        "ONNX Runtime GroupQueryAttention (the export's)": lambda: gqa.run(None, gqa_in),
        "ONNX Runtime MultiHeadAttention (kv heads repeated)": lambda: mha.run(None, mha_in),
        "ONNX Runtime Attention, opset 23 (no past key)": lambda: std.run(None, std_in),
        "torch scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask,
                                                                                      scale=scale),
    }


def time_kernels(kernels: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call over interleaved rounds (each round calls every kernel `calls` times)."""
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for run in kernels.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in kernels.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: statistics.median(times) for name, times in samples.items()}


def _op_times(session: Any, runs: int) -> dict[str, float]:
    """Milliseconds per op type per run from the profile ONNX Runtime wrote for `session`, largest first. An If's
    time is left out: its branch's nodes are profiled themselves (the weight-only layers' subgraphs)."""
    totals: collections.Counter[str] = collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["args"]["op_name"] != "If"):
            totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return dict(totals.most_common())


def profile_graph(path: Path, config: Any, past: dict[str, np.ndarray] | None, ctx: int, new_tokens: int,
                  threads: int | None, prefills: int = 3) -> dict[str, dict[str, float]]:
    """Milliseconds per op type of the optimized graph at `path`, ONNX Runtime's profiler, run as generation runs
    it (`SharedKV`: one KV buffer for past and present, the prompt in calls of PREFILL_CHUNK tokens): per prefill
    of `ctx` tokens after `past` (mean of `prefills`) and over `new_tokens` decode steps after one (a session of
    their own, from the prefill's KV); under "wall" the same two phases by the clock (kernels plus ONNX Runtime's
    and Python's per-call work)."""
    ids = np.random.default_rng(0).integers(100, config.vocab_size - 1, size=(1, ctx + new_tokens))
    result: dict[str, dict[str, float]] = {"wall": {}}
    with tempfile.TemporaryDirectory(prefix="sinkquant-ort-profile-") as tmp:

        def profiled(phase: str) -> OnnxCausalLM:
            options = session_options(threads)
            options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / phase)
            return OnnxCausalLM(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), config)

        model, capacity = profiled("prefill"), past_length(past) + ctx + new_tokens
        buffers = [SharedKV(model, capacity, past) for _ in range(prefills)]
        start = time.perf_counter()
        for kv in buffers:
            kv.next_logits(ids[:, :ctx])
        result["wall"]["prefill"] = (time.perf_counter() - start) * 1e3 / prefills
        result["prefill"] = _op_times(model.session, prefills)
        kv = SharedKV(profiled("decode"), capacity, kv.past())
        start = time.perf_counter()
        for step in range(ctx, ctx + new_tokens):
            kv.next_logits(ids[:, step:step + 1])
        result["wall"]["decode"] = (time.perf_counter() - start) * 1e3
        result["decode"] = _op_times(kv.session, 1)
    return result


def profiles(folder: Path, model: torch.nn.Module, ctx: int, new_tokens: int, threads: int | None
             ) -> dict[str, dict[str, dict[str, float]]]:
    """The export's profile (its prefix KV as the first past, as `sinkquant eval` runs it) and the fp32 graph's
    of the same model (no past), the ONNX Runtime fp32 row of eval/bench_onnx.py."""
    exported, prefix, _ = load_onnx(folder, threads=threads)
    past = prefix_arrays(prefix)
    with tempfile.TemporaryDirectory(prefix="sinkquant-fp32-graph-") as tmp:
        fp32 = write_fp32_graph(model, Path(tmp))
        return {folder.name: profile_graph(folder / MODEL_FILE, exported.model.config, past, ctx, new_tokens,
                                           threads),
                FP32_GRAPH: profile_graph(fp32, exported.model.config, None, ctx, new_tokens, threads)}


FP32_GRAPH = "fp32 graph"
INTEGER_OPS = ("MatMulIntegerToFloat", "QuantizeLinear", "Clip")  # the int8 Linears: ONNX Runtime's fused kernels


def main() -> None:
    p = parser(__doc__, windows=0, out="eval/results/ort-attention")
    p.add_argument("--export", type=Path, default=None,
                   help="an ONNX export folder to profile op by op (from `sinkquant export ART --format onnx`)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    configure(args)
    loaded = load_model(args.model)
    config = loaded.model.config
    kernels = time_kernels(attention_kernels(config, args.ctx, args.threads), args.rounds, calls=5)
    reference = kernels["torch scaled_dot_product_attention"]
    lines = [f"Causal attention of {args.ctx} queries over {args.ctx + 1} keys at {args.model}'s shape "
             f"({config.num_attention_heads} heads, {config.num_key_value_heads} kv heads), one layer, "
             f"threads {args.threads or torch.get_num_threads()}, median of {args.rounds} interleaved rounds:", "",
             "| kernel | ms per layer | vs torch SDPA |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / reference:.2f}x |" for name, ms in kernels.items()]
    payload: dict[str, Any] = {"attention_ms": kernels}
    if args.export is not None:
        measured = profiles(args.export, loaded.model, args.ctx, args.new_tokens, args.threads)
        window = torch.randint(100, config.vocab_size - 1, (1, args.ctx), generator=torch.Generator().manual_seed(0))
        torch_ms = args.ctx / measure(loaded.model, lambda: None, window, 0, args.rounds)["prefill_tokens_per_s"] * 1e3
        payload.update(profile_ms=measured, torch_fp32_prefill_ms=torch_ms)
        for graph, profile in measured.items():
            for phase in ("prefill", "decode"):
                totals, total = profile[phase], sum(profile[phase].values())
                what = (f"one prefill of {args.ctx} tokens (calls of {PREFILL_CHUNK})" if phase == "prefill"
                        else f"{args.new_tokens} decode steps")
                lines += ["", f"{graph}, ONNX Runtime's profiler, {what}: {total:.0f} ms in kernels, "
                          f"{profile['wall'][phase]:.0f} ms by the clock", "",
                          "| op type | ms | share |", "|---|---|---|"]
                lines += [f"| {op} | {ms:.1f} | {100 * ms / total:.1f}% |" for op, ms in list(totals.items())[:8]]
        ours, fp32 = (sum(measured[g]["prefill"].values()) for g in (args.export.name, FP32_GRAPH))
        ceiling = ours - sum(ms for op, ms in measured[args.export.name]["prefill"].items() if op in INTEGER_OPS)
        payload["prefill_ms_without_integer_ops"] = ceiling
        lines += ["", f"Prefill of {args.ctx} tokens: torch fp32 {torch_ms:.0f} ms, ONNX Runtime fp32 graph {fp32:.0f} "
                  f"ms, the export {ours:.0f} ms ({torch_ms / ours:.2f}x torch fp32, {fp32 / ours:.2f}x ONNX Runtime "
                  f"fp32; kernel time). With its integer matmuls and their quantization ({', '.join(INTEGER_OPS)}) "
                  f"taken as free the export would still take {ceiling:.0f} ms: at most {torch_ms / ceiling:.2f}x "
                  f"torch fp32 and {fp32 / ceiling:.2f}x ONNX Runtime fp32 at this thread count."]
        decode = {g: (sum(measured[g]["decode"].values()), measured[g]["wall"]["decode"]) for g in measured}
        (ours_k, ours_w), (fp32_k, fp32_w) = decode[args.export.name], decode[FP32_GRAPH]
        lines += ["", f"Decode of {args.new_tokens} tokens: the export {fp32_k / ours_k:.2f}x ONNX Runtime fp32 in "
                  f"kernel time ({ours_k:.0f} / {fp32_k:.0f} ms), {fp32_w / ours_w:.2f}x by the clock "
                  f"({ours_w:.0f} / {fp32_w:.0f} ms)."]
    write_result(args.out, "ONNX Runtime: attention kernels and where the export's time goes", "\n".join(lines),
                 payload)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "eval"))
    main()
