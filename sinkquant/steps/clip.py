"""Activation clipping chosen per layer: the ratio of the calibrated range that minimises the layer's output
error ||W Q(x) - W x||^2 on calibration tokens, sink tokens left out (they stay in full precision anyway)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sinkquant.quant.primitives import qrange, quantize_dequantize, scale_zero_point
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import ClipConfig, ClipSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

__all__ = ["Clip", "ClipConfig"]


@register
class Clip(ClipSpec, Step):
    @torch.no_grad()
    def apply(self, session: Session) -> dict[str, Any]:
        """Inputs are captured after upstream layers are quantized, so each layer's search sees the inputs it
        will see at inference."""
        cfg = self.config
        static = {n: m for n, m in session.quantized.items() if m.activations is not None and m.act_scale is not None}
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in static}
        generator = torch.Generator().manual_seed(cfg.seed)

        def make_hook(name: str, layer):
            def hook(_module, args):
                x = args[0]
                mask = layer.keep.mask_for(x)
                rows = x.reshape(-1, x.shape[-1]) if mask is None else x[~mask]
                pick = torch.randperm(rows.shape[0], generator=generator)[: cfg.samples].to(rows.device)
                captured[name].append(rows[pick].detach().clone())

            return hook

        handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in static.items()]
        try:
            for kwargs in session.batches():
                session.model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()

        ratios = torch.linspace(cfg.min_ratio, 1.0, cfg.grid)
        chosen: dict[str, float] = {}
        for name, layer in static.items():
            x = torch.cat(captured[name])[: cfg.samples * 4]
            spec = layer.activations
            factor = _output_error_factor(layer.dense_weight(x.dtype))
            lo, hi = _range_from(layer.act_scale, layer.act_zero_point, spec.bits, spec.symmetric)
            errors = []
            for ratio in ratios:
                scale, zp = scale_zero_point(lo * ratio, hi * ratio, spec.bits, spec.symmetric)
                error = quantize_dequantize(x, scale, zp, spec.bits, spec.symmetric) - x
                errors.append(float((error @ factor).pow(2).sum()))
            best = float(ratios[int(torch.tensor(errors).argmin())])
            layer.act_scale, layer.act_zero_point = scale_zero_point(lo * best, hi * best, spec.bits, spec.symmetric)
            chosen[name] = best
        return {"mean_ratio": sum(chosen.values()) / max(len(chosen), 1), "ratios": chosen}


def _output_error_factor(weight: torch.Tensor) -> torch.Tensor:
    """F with ||E F||^2 = ||E W^T||^2 for every input error E, as narrow as the layer allows: W^T itself when the
    layer has no more outputs than inputs, else R^T from W = QR (Q has orthonormal columns), which makes the
    search of a widening layer (gate/up: 576 -> 1536 in SmolLM2) cost in x in instead of in x out per row."""
    out_features, in_features = weight.shape
    if out_features <= in_features:
        return weight.t()
    return torch.linalg.qr(weight.float(), mode="r").R.t().to(weight.dtype)  # no QR kernel for 16-bit floats


def _range_from(scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool):
    qmin, qmax = qrange(bits, symmetric)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale
