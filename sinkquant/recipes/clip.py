"""Activation clipping chosen per layer: the ratio of the calibrated range that minimises the layer's output
error ||W Q(x) - W x||^2 on calibration tokens, sink tokens left out (they stay in full precision anyway)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sinkquant.quant import QuantLinear
from sinkquant.quant.primitives import qrange, quantize_dequantize, scale_zero_point


@torch.no_grad()
def clip_activations(
    model: torch.nn.Module, layers: dict[str, QuantLinear], batches: Iterable[dict], grid: int, min_ratio: float,
    samples: int, seed: int = 0,
) -> dict[str, float]:
    """Returns the chosen ratio per layer. Inputs are captured after upstream layers are quantized, so each
    layer's search sees the inputs it will see at inference."""
    static = {n: m for n, m in layers.items() if m.activations is not None and m.act_scale is not None}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in static}
    generator = torch.Generator().manual_seed(seed)

    def make_hook(name: str, layer: QuantLinear):
        def hook(_module, args):
            x = args[0]
            mask = layer.keep.mask_for(x)
            rows = x.reshape(-1, x.shape[-1]) if mask is None else x[~mask]
            pick = torch.randperm(rows.shape[0], generator=generator)[:samples]
            captured[name].append(rows[pick].detach().clone())

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in static.items()]
    try:
        for kwargs in batches:
            model(**kwargs)
    finally:
        for handle in handles:
            handle.remove()

    ratios = torch.linspace(min_ratio, 1.0, grid)
    chosen: dict[str, float] = {}
    for name, layer in static.items():
        x = torch.cat(captured[name])[: samples * 4]
        spec = layer.activations
        reference = x @ layer.weight.t()
        # Recover the calibrated range from scale / zero-point, then shrink it.
        lo, hi = _range_from(layer.act_scale, layer.act_zero_point, spec.bits, spec.symmetric)
        errors = []
        for ratio in ratios:
            scale, zp = scale_zero_point(lo * ratio, hi * ratio, spec.bits, spec.symmetric)
            out = quantize_dequantize(x, scale, zp, spec.bits, spec.symmetric) @ layer.weight.t()
            errors.append(float((out - reference).pow(2).sum()))
        best = float(ratios[int(torch.tensor(errors).argmin())])
        scale, zp = scale_zero_point(lo * best, hi * best, spec.bits, spec.symmetric)
        layer.act_scale, layer.act_zero_point = scale, zp
        chosen[name] = best
    return chosen


def _range_from(scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool):
    qmin, qmax = qrange(bits, symmetric)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale
