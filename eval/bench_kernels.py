"""Integer GEMM candidates for the native backend on SmolLM2's Linear shapes, as ratios to fp32 F.linear.

Prefill rows (--rows, default 512 = ctx 512, batch 1) and decode rows (1). For each decoder Linear shape:
fp32 F.linear; torch._int_mm on the stored int8 weight [out, in] read transposed (no copy) and on a
contiguous [in, out] copy; torchao's Int8StaticActivationInt8WeightConfig fed with a calibrated per-tensor
scale; the whole NativeLinear W8A8 static forward (rounding the activations, int32 zero-point correction,
scales); torch's weight-only kernels aten._weight_int8pack_mm (int8 per row) and
aten._weight_int4pack_mm_for_cpu (int4 group 64) with fp32 activations; NativeLinear W8A16 (three int8 limbs
of the activations through torch._int_mm) and W4A16 group 64 (weight dequantized per call).
Times are the median of --repeats calls after warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from benchlib import configure, parser, write_result

from sinkquant.backends.native import NativeLinear
from sinkquant.models import load_model
from sinkquant.quant.primitives import scale_zero_point
from sinkquant.quant.qweight import quantize_rtn
from sinkquant.quant.scheme import ActivationSpec

LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torchao_static(linear: torch.nn.Linear, scale: torch.Tensor, x: torch.Tensor) -> torch.nn.Module | None:
    """torchao's static int8 Linear with our calibrated per-tensor scale; None where this torchao lacks it."""
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, quantize_
    from torchao.quantization.granularity import PerRow, PerTensor

    module = torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features, bias=False))
    module[0].weight.data.copy_(linear.weight.data)
    try:
        quantize_(module, Int8StaticActivationInt8WeightConfig(act_quant_scale=scale.reshape(1, 1),
                                                               granularity=[PerTensor(), PerRow()],
                                                               set_inductor_config=False))
        module(x)
    except Exception as exc:  # noqa: BLE001 - report the peer's own refusal, keep measuring the rest
        print(f"torchao static int8 unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None
    return module


def bench_shape(linear: torch.nn.Linear, x: torch.Tensor, repeats: int) -> dict[str, float]:
    weight = linear.weight.detach()
    scale, zero_point = scale_zero_point(x.amin(), x.amax(), 8, True)
    static = ActivationSpec(bits=8, mode="static", symmetric=True)
    w8 = quantize_rtn(weight, 8, "channel")
    native_w8a8 = NativeLinear(w8, None, static, scale, zero_point)
    native_w8a16 = NativeLinear(w8)
    w4 = quantize_rtn(weight, 4, "group", 64, symmetric=False)
    native_w4a16 = NativeLinear(w4)
    int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w4.qweight.to(torch.int32), 1)
    int4_scale_zero = torch.stack([w4.scale.t(), ((8 - w4.zero_point) * w4.scale).t()], dim=-1).contiguous()
    row_scale = w8.scale.reshape(-1)
    q_act = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    stored = w8.qweight
    transposed = stored.t().contiguous()
    peer = torchao_static(linear, scale, x)
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 F.linear": lambda: F.linear(x, weight),
        "_int_mm (stored [out,in] read transposed)": lambda: torch._int_mm(q_act, stored.t()),
        "_int_mm (contiguous [in,out] copy)": lambda: torch._int_mm(q_act, transposed),
        "native W8A8 static (whole forward)": lambda: native_w8a8(x),
        "aten._weight_int8pack_mm (W8A16)": lambda: torch.ops.aten._weight_int8pack_mm(x, stored, row_scale),
        "aten._weight_int4pack_mm_for_cpu (W4A16 g64)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, int4_pack, 64, int4_scale_zero),
        "native W8A16 (3 int8 limbs, _int_mm)": lambda: native_w8a16(x),
        "native W4A16 g64 (dequantized per call)": lambda: native_w4a16(x),
    }
    if peer is not None:
        candidates["torchao static int8 (per-tensor act, per-row weight)"] = lambda: peer(x)
    with torch.no_grad():
        return {name: median_seconds(fn, repeats) for name, fn in candidates.items()}


def main() -> None:
    p = parser(__doc__, windows=1, out="eval/results/kernels")
    p.add_argument("--rows", type=int, nargs="+", default=[512, 1], help="activation rows: prefill and decode")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    configure(args)
    loaded = load_model(args.model)
    layer0 = loaded.model.model.layers[0]
    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = ["| layer (in -> out) | rows | candidate | ms | vs fp32 |", "|---|---:|---|---:|---:|"]
    for name in LAYERS:
        linear = layer0.get_submodule(name)
        for rows in args.rows:
            x = torch.randn(rows, linear.in_features) * 2
            times = bench_shape(linear, x, args.repeats)
            results[f"{name}/{rows}"] = times
            fp32 = times["fp32 F.linear"]
            for candidate, seconds in times.items():
                lines.append(f"| {name} ({linear.in_features} -> {linear.out_features}) | {rows} | {candidate} | "
                             f"{seconds * 1e3:.3f} | {fp32 / seconds:.2f}x |")
    body = "\n".join(lines) + ("\n\n'vs fp32' is fp32 time / candidate time (higher is faster). "
                               "Shared machine: other processes ran beside it.")
    write_result(args.out, "Integer kernel candidates on SmolLM2 Linear shapes", body,
                 {"results": results, "threads": torch.get_num_threads(), "repeats": args.repeats})


if __name__ == "__main__":
    main()
