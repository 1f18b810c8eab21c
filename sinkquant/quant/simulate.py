"""Simulated (quantize-dequantize) model: decoder nn.Linear layers become QuantLinear, static activation
ranges are calibrated with kept positions left out, and kept positions bypass activation quantization."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sinkquant.adapters import Adapter
from sinkquant.errors import SinkquantError
from sinkquant.quant.keep import KeepState, attach_keep_state
from sinkquant.quant.observers import Observer, make_observer
from sinkquant.quant.primitives import (
    fake_quant_dynamic,
    fake_quant_range,
    quantize_dequantize,
    quantize_weight,
    scale_zero_point,
)
from sinkquant.quant.scheme import GROUP_SIZES, ActivationSpec, QuantScheme, WeightSpec


def fake_quant_activation(
    x: torch.Tensor,
    spec: ActivationSpec,
    keep: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize x [..., hidden]; rows marked in `keep` come back bit-exact and never shape a dynamic
    per-tensor range (they are zeroed for the min/max, which is harmless as the grid always contains 0)."""
    if spec.mode == "static":
        if scale is None or zero_point is None:
            raise SinkquantError("static activation quantization needs a calibrated scale; run calibration first")
        out = quantize_dequantize(x, scale, zero_point, spec.bits, spec.symmetric)
    elif spec.mode == "dynamic-token":
        out = fake_quant_dynamic(x, spec.bits, per_token=True, symmetric=spec.symmetric)
    else:
        ranged = x if keep is None else x.masked_fill(keep.unsqueeze(-1), 0.0)
        out = fake_quant_range(x, ranged.amin(), ranged.amax(), spec.bits, spec.symmetric)
    return out if keep is None else torch.where(keep.unsqueeze(-1), x, out)


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear: holds the fake-quantized weight and quantizes its input on the fly. With
    static activations, `act_scale` / `act_zero_point` are buffers (saved in the state dict)."""

    def __init__(
        self, linear: nn.Linear, weights: WeightSpec | None, activations: ActivationSpec | None, keep: KeepState
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if weights is not None:
            weight = quantize_weight(weight, weights.bits, weights.granularity, weights.group_size, weights.symmetric)
        self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weights_spec = weights
        self.activations = activations
        self.keep = keep
        self.observer: Observer | None = None
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero_point", None)

    def start_calibration(self) -> None:
        spec = self.activations
        self.observer = make_observer(spec.observer, spec.bits, spec.symmetric, spec.percentile)

    def finish_calibration(self) -> None:
        xmin, xmax = self.observer.range()
        scale, zero_point = scale_zero_point(xmin, xmax, self.activations.bits, self.activations.symmetric)
        self.act_scale = scale.to(self.weight.device)
        self.act_zero_point = zero_point.to(self.weight.device)
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            keep = self.keep.mask_for(x)
            if self.observer is not None:
                self.observer.update(x, keep)
            else:
                x = fake_quant_activation(x, self.activations, keep, self.act_scale, self.act_zero_point)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weights={self.weights_spec}, act={self.activations}"


@dataclass
class QuantSummary:
    """What quantize_model did, for reports."""

    quantized: list[str]
    excluded: list[str]
    calibration_tokens: int = 0
    calibration_kept_tokens: int = 0
    kv: bool = False


def _check_group_sizes(layers: dict[str, nn.Linear], weights: WeightSpec | None) -> None:
    if weights is None or weights.granularity != "group":
        return
    for name, linear in layers.items():
        if linear.in_features % weights.group_size:
            valid = [g for g in GROUP_SIZES if linear.in_features % g == 0] or ["none of " + str(GROUP_SIZES)]
            raise SinkquantError(
                f"{name}: group_size={weights.group_size} does not divide its input width {linear.in_features}; "
                f"valid group sizes for this layer: {', '.join(map(str, valid))} (or exclude it)"
            )


Batch = torch.Tensor | dict[str, Any]


def _forward_kwargs(batch: Batch, device: torch.device) -> dict[str, Any]:
    """A batch is input ids [batch, seq] (or [seq]), or forward kwargs, e.g. with a prefix KV cache."""
    if isinstance(batch, dict):
        return {**batch, "input_ids": batch["input_ids"].to(device)}
    batch = batch.unsqueeze(0) if batch.dim() == 1 else batch
    return {"input_ids": batch.to(device), "use_cache": False}


@torch.no_grad()
def calibrate(model: nn.Module, layers: list[QuantLinear], batches: Iterable[Batch]) -> int:
    """Run `batches` through the model with observers on (inputs left in fp); returns tokens seen."""
    device = next(model.parameters()).device
    for layer in layers:
        layer.start_calibration()
    tokens = 0
    try:
        for batch in batches:
            kwargs = _forward_kwargs(batch, device)
            model(**kwargs)
            tokens += kwargs["input_ids"].numel()
    except BaseException:
        # A failed calibration must not leave observers on: later forwards would observe instead of quantize.
        for layer in layers:
            layer.observer = None
        raise
    if tokens == 0:
        raise SinkquantError("calibration got no batches; pass at least one [batch, seq] tensor of input ids")
    for layer in layers:
        layer.finish_calibration()
    return tokens


def quantize_model(
    model: nn.Module, adapter: Adapter, scheme: QuantScheme, calib_batches: Iterable[Batch] | None = None,
    restore: bool = False,
) -> QuantSummary:
    """Quantize `model` in place (pass a copy to keep the original): swap decoder Linear layers not matched
    by `scheme.exclude`, calibrate static activation ranges on `calib_batches`, and enable KV-cache
    fake-quant. lm_head and embeddings are never candidates, so tied weights stay tied.

    `restore=True` builds the same structure without calibrating, with placeholder static scales, so that a
    saved state dict (weights and calibrated scales) can be loaded into it."""
    if getattr(model, "_sinkquant_keep", None) is not None:
        raise SinkquantError("model already carries sinkquant quantization; pass a fresh copy of the model")
    if scheme.needs_calibration and calib_batches is None and not restore:
        raise SinkquantError("activations.mode='static' needs calib_batches (input ids disjoint from evaluation)")
    layers = adapter.linear_layers(model)
    selected = {n: m for n, m in layers.items() if not any(fnmatch.fnmatchcase(n, p) for p in scheme.exclude)}
    for pattern in scheme.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise SinkquantError(f"exclude pattern {pattern!r} matches no layer; names look like {next(iter(layers))}")
    _check_group_sizes(selected, scheme.weights)
    state = attach_keep_state(model, scheme.keep)
    swapped: list[QuantLinear] = []
    if scheme.weights is not None or scheme.activations is not None:
        for name, linear in selected.items():
            parent_name, _, child = name.rpartition(".")
            quant = QuantLinear(linear, scheme.weights, scheme.activations, state)
            setattr(model.get_submodule(parent_name), child, quant)
            swapped.append(quant)
    summary = QuantSummary(quantized=list(selected) if swapped else [], excluded=sorted(set(layers) - set(selected)))
    if scheme.needs_calibration and restore:
        for layer in swapped:
            layer.act_scale = torch.ones((), device=layer.weight.device)
            layer.act_zero_point = torch.zeros((), device=layer.weight.device)
    elif scheme.needs_calibration:
        kept_before = state.tokens_kept
        summary.calibration_tokens = calibrate(model, swapped, calib_batches)
        summary.calibration_kept_tokens = state.tokens_kept - kept_before
    if scheme.kv is not None:
        from sinkquant.quant.kv import enable_kv_quant

        enable_kv_quant(model, adapter, scheme.kv, state)
        summary.kv = True
    return summary
