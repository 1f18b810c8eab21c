"""The simulated backend: decoder nn.Linear layers become QuantLinear, which hold the integer weight and
dequantize it on the fly, quantize-dequantize their input (kept positions bypass it), and observe their input
during calibration. What is saved is the integers and the scales; the floating-point copy is transient."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sinkquant.adapters import Adapter
from sinkquant.errors import SinkquantError
from sinkquant.models import model_device
from sinkquant.quant.keep import KeepState
from sinkquant.quant.observers import Observer, make_observer
from sinkquant.quant.primitives import fake_quant_dynamic, fake_quant_range, quantize_dequantize, scale_zero_point
from sinkquant.quant.qweight import QuantizedWeight, quantize_rtn
from sinkquant.quant.scheme import ActivationScheme, Scheme, WeightScheme


def fake_quant_activation(
    x: torch.Tensor,
    spec: ActivationScheme,
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
    """Drop-in for nn.Linear. Until `set_qweight` the weight is the original floating-point one (GPTQ needs it to
    collect Hessians); afterwards only the integers (`weight_int`), `weight_scale` and `weight_zero_point` are
    held. With static activations, `act_scale` / `act_zero_point` are buffers."""

    def __init__(self, linear: nn.Linear, weights: WeightScheme | None, activations: ActivationScheme | None,
                 keep: KeepState) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights_spec = weights
        self.activations = activations
        self.keep = keep
        self.observer: Observer | None = None
        self.held: torch.Tensor | None = None  # a dequantized weight held while the pipeline runs this layer
        self.weight: nn.Parameter | None = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        for name in ("weight_int", "weight_scale", "weight_zero_point", "act_scale", "act_zero_point"):
            self.register_buffer(name, None)

    @property
    def qweight(self) -> QuantizedWeight | None:
        """The integer weight with its grid, as every backend and the export read it."""
        if self.weight_int is None:
            return None
        spec = self.weights_spec
        return QuantizedWeight(self.weight_int, self.weight_scale, self.weight_zero_point, spec.bits,
                               spec.granularity, spec.group_size, spec.symmetric)

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        """Replace the floating-point weight by its integer form (the fp copy is dropped)."""
        self.weight_int, self.weight_scale, self.weight_zero_point = qweight.qweight, qweight.scale, \
            qweight.zero_point
        self.weight = None

    def quantize_rtn(self) -> None:
        spec = self.weights_spec
        self.set_qweight(quantize_rtn(self.weight, spec.bits, spec.granularity, spec.group_size, spec.symmetric))

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the simulator multiplies with: the dequantized integers, or the fp weight before that."""
        if self.weight_int is None:
            return self.weight.to(dtype)
        if self.held is not None and self.held.dtype == dtype:
            return self.held
        return self.qweight.dequantize(dtype)

    @contextlib.contextmanager
    def holding(self, dtype: torch.dtype) -> Iterator[None]:
        """Dequantize once for a block that runs this layer many times (one layer's weights, transiently)."""
        self.held = self.qweight.dequantize(dtype) if self.weight_int is not None else None
        try:
            yield
        finally:
            self.held = None

    @contextlib.contextmanager
    def float_inputs(self) -> Iterator[None]:
        """Inputs pass unquantized, as calibration observes them: GPTQ collects its Hessians this way, before any
        static activation scale exists."""
        saved, self.activations = self.activations, None
        try:
            yield
        finally:
            self.activations = saved

    def start_calibration(self) -> None:
        spec = self.activations
        self.observer = make_observer(spec.observer, spec.bits, spec.symmetric, spec.percentile)

    def finish_calibration(self) -> None:
        xmin, xmax = self.observer.range()
        scale, zero_point = scale_zero_point(xmin, xmax, self.activations.bits, self.activations.symmetric)
        self.act_scale = scale.to(self.weight_device)
        self.act_zero_point = zero_point.to(self.weight_device)
        self.observer = None

    @property
    def weight_device(self) -> torch.device:
        return (self.weight if self.weight is not None else self.weight_int).device

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer computes with it: fake-quantized on its calibrated grid, kept rows exact."""
        return fake_quant_activation(x, self.activations, self.keep.mask_for(x), self.act_scale, self.act_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations is not None:
            if self.observer is not None:
                self.observer.update(x, self.keep.mask_for(x))
            else:
                x = self.quantize_input(x)
        return F.linear(x, self.dense_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, weights={self.weights_spec}, act={self.activations}"


def candidate_layers(model: nn.Module, adapter: Adapter, scheme: Scheme) -> tuple[dict[str, nn.Linear], list[str]]:
    """Decoder Linear layers the scheme quantizes (not matched by `exclude`), and the excluded names."""
    layers = adapter.linear_layers(model)
    for pattern in scheme.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            raise SinkquantError(f"scheme.exclude: pattern {pattern!r} matches no layer; names look like "
                                 f"{next(iter(layers))}")
    selected = {n: m for n, m in layers.items() if not any(fnmatch.fnmatchcase(n, p) for p in scheme.exclude)}
    return selected, sorted(set(layers) - set(selected))


def check_group_size(layers: dict[str, nn.Linear], weights: WeightScheme | None) -> None:
    """A group must divide every quantized layer's input width; the valid sizes come from the model itself."""
    if weights is None or weights.granularity != "group":
        return
    widths = sorted({linear.in_features for linear in layers.values()})
    if any(width % weights.group_size for width in widths):
        from math import gcd

        common = 0
        for width in widths:
            common = gcd(common, width)
        valid = [g for g in range(2, common + 1) if common % g == 0]
        raise SinkquantError(
            f"scheme.weights.group_size={weights.group_size} does not divide the input widths {widths} of this "
            f"model's quantized layers; valid group sizes: {', '.join(map(str, valid))} (or exclude layers)"
        )


def carry_transforms(source: nn.Module, target: nn.Module) -> None:
    """Online transforms a step put in front of a layer (a rotation of its input: a child module applied by a
    forward pre-hook) move with it when the layer is replaced."""
    for name, module in source.named_children():
        target.add_module(name, module)
    target._forward_pre_hooks.update(source._forward_pre_hooks)


def swap_linears(model: nn.Module, layers: dict[str, nn.Linear], scheme: Scheme, keep: KeepState
                 ) -> dict[str, QuantLinear]:
    """Put a QuantLinear in place of each selected nn.Linear (weights still floating point)."""
    swapped: dict[str, QuantLinear] = {}
    for name, linear in layers.items():
        parent_name, _, child = name.rpartition(".")
        quant = QuantLinear(linear, scheme.weights, scheme.activations, keep)
        carry_transforms(linear, quant)
        setattr(model.get_submodule(parent_name), child, quant)
        swapped[name] = quant
    return swapped


def forward_kwargs(batch: torch.Tensor | dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch is input ids [batch, seq] (or [seq]), or forward kwargs, e.g. with a prefix KV cache. Observers
    read Linear inputs only: logits for the last position alone."""
    if isinstance(batch, dict):
        return {"logits_to_keep": 1, **batch, "input_ids": batch["input_ids"].to(device)}
    batch = batch.unsqueeze(0) if batch.dim() == 1 else batch
    return {"input_ids": batch.to(device), "use_cache": False, "logits_to_keep": 1}


@torch.no_grad()
def calibrate(model: nn.Module, layers: Iterable[QuantLinear], batches: Iterable[torch.Tensor | dict[str, Any]]
              ) -> int:
    """Whole-model calibration: run `batches` through the model with observers on (inputs left in floating point);
    returns the number of tokens seen."""
    layers = [layer for layer in layers if layer.activations is not None]
    device = model_device(model)
    for layer in layers:
        layer.start_calibration()
    tokens = 0
    try:
        for batch in batches:
            kwargs = forward_kwargs(batch, device)
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
