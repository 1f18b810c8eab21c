"""The native backend: a Linear that stores integer weights (int8; int4 packed two per byte) and runs CPU
integer kernels, computing the same numbers as the simulator up to float rounding.

Kernels (chosen by eval/bench_kernels.py on SmolLM2's Linear shapes):
- activations quantized, weights int8/int4 per tensor or per row: activations rounded onto their int8 grid
  (static calibrated scale, or a dynamic one per token / per tensor), `torch._int_mm` (int8 x int8 -> int32,
  oneDNN on CPU); zero points are corrected exactly in int32 with the weight's column sums and the
  activation's row sums, then one float multiply by the two scales.
- weight-only (W8A16, exceptions, kept rows): `aten._weight_int8pack_mm` for int8 per-row weights,
  `aten._weight_int4pack_mm_for_cpu` for int4 with group scales (32/64/128/256 dividing the input width;
  an asymmetric zero point becomes the kernel's additive zero), else the weight is dequantized for that
  call only.
- group-wise weights with quantized activations have no integer GEMM here: the activations are rounded onto
  their grid in float and fed to the weight-only kernel (same numbers, no int8 activation GEMM).

Kept positions (sink tokens, prefix positions) skip activation quantization: their rows go through the
weight-only path, exactly as the simulator's `torch.where(keep, x, fake_quant(x))` does."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sinkquant.errors import SinkquantError
from sinkquant.quant.primitives import qrange, scale_zero_point
from sinkquant.quant.qweight import QuantizedWeight

ACTIVATION_MODES = ("static", "dynamic-token", "dynamic-tensor")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Offset that maps an unsigned 8-bit grid onto int8, which is what the int8 GEMM takes.
UINT8_SHIFT = 128


class Keep(Protocol):
    """What the module needs from the keep state shared by every layer (sinkquant.quant.keep.KeepState)."""

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None: ...


def _int4_kernel_group(qweight: QuantizedWeight) -> int | None:
    """Group size the int4 CPU kernel runs this weight with (a per-row weight repeats its scale per group)."""
    if qweight.bits > 4:
        return None
    in_features = qweight.shape[1]
    if qweight.granularity == "group":
        group = qweight.group_size
        return group if group in INT4_KERNEL_GROUPS and in_features % group == 0 else None
    fitting = [g for g in INT4_KERNEL_GROUPS if in_features % g == 0]
    return fitting[-1] if fitting else None


class NativeLinear(nn.Module):
    """Drop-in for nn.Linear over a QuantizedWeight. The state dict holds the integers (`qweight`: int8 /
    uint8, int4 packed two per byte), float32 `weight_scale` / `weight_zero_point`, the bias and, for static
    activations, `act_scale` / `act_zero_point`; kernel layouts are derived from them after construction
    and after every load_state_dict, never saved."""

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        activations: Any | None = None,
        act_scale: torch.Tensor | None = None,
        act_zero_point: torch.Tensor | None = None,
        keep: Keep | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits, self.granularity, self.group_size = qweight.bits, qweight.granularity, qweight.group_size
        self.symmetric = qweight.symmetric
        self.act_bits, self.act_mode, self.act_symmetric = _activation_fields(activations)
        if self.act_mode == "static" and (act_scale is None or act_zero_point is None):
            raise SinkquantError("activations.mode='static' needs act_scale and act_zero_point (run calibration first)")
        if self.act_mode is not None and self.act_bits > 8:
            raise SinkquantError(f"activations.bits={self.act_bits} has no integer kernel; valid: 2..8")
        self.keep = keep
        self.register_buffer("qweight", qweight.packed().contiguous())
        self.register_buffer("weight_scale", qweight.scale.detach().float().clone())
        self.register_buffer("weight_zero_point", qweight.zero_point.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        static = self.act_mode == "static"
        self.register_buffer("act_scale", act_scale.detach().float().clone() if static else None)
        self.register_buffer("act_zero_point", act_zero_point.detach().float().clone() if static else None)
        for name in ("_w_int8", "_w_colsum", "_w_rowscale", "_w_zero", "_int4_pack", "_int4_scale_zero"):
            self.register_buffer(name, None, persistent=False)
        self._int4_group: int | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())
        self.prepare()

    @classmethod
    def from_quant_linear(cls, module: nn.Module) -> NativeLinear:
        """Convert the engine's quantized layer (duck-typed: `.qweight` QuantizedWeight, `.bias`, `.activations`,
        `.act_scale` / `.act_zero_point` for static activations, `.keep`)."""
        qweight = getattr(module, "qweight", None)
        if not isinstance(qweight, QuantizedWeight):
            raise SinkquantError(
                f"{type(module).__name__} has no QuantizedWeight in .qweight; the native backend converts "
                "quantized layers of the engine (sinkquant.quant.qweight.QuantizedWeight)"
            )
        return cls(qweight, getattr(module, "bias", None), getattr(module, "activations", None),
                   getattr(module, "act_scale", None), getattr(module, "act_zero_point", None),
                   getattr(module, "keep", None))

    def quantized_weight(self) -> QuantizedWeight:
        """The integer weight back (unpacked), e.g. for an export."""
        values = QuantizedWeight.unpack(self.qweight, self.bits, self.symmetric)
        return QuantizedWeight(values, self.weight_scale, self.weight_zero_point, self.bits, self.granularity,
                               self.group_size, self.symmetric)

    @torch.no_grad()
    def prepare(self) -> None:
        """Derive the kernel layouts from the stored integers."""
        qweight = self.quantized_weight()
        per_row = self.granularity != "group"
        out_features = self.out_features
        if per_row and (self.act_mode is not None or self.bits > 4):
            # int8 values for the GEMMs; a symmetric int8 weight is used as stored (no copy).
            values = qweight.qweight
            if not self.symmetric:
                values = (values.to(torch.int16) - UINT8_SHIFT).to(torch.int8)
            self._w_int8 = values.contiguous()
            self._w_colsum = values.to(torch.int32).sum(dim=1)
            self._w_rowscale = self.weight_scale.expand(out_features, 1).reshape(out_features).contiguous()
            zero = self.weight_zero_point.expand(out_features, 1).reshape(out_features)
            self._w_zero = None if self.symmetric else (zero - UINT8_SHIFT).round().to(torch.int32)
        self._int4_group = _int4_kernel_group(qweight)
        if self._int4_group is not None:
            group = self._int4_group
            offset = 0 if not self.symmetric else 2 ** (self.bits - 1)
            nibbles = (qweight.qweight.to(torch.int32) + offset).contiguous()
            self._int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
            groups = self.in_features // group
            if per_row:
                scale = self.weight_scale.expand(out_features, 1).expand(out_features, groups)
                zero_point = self.weight_zero_point.expand(out_features, 1).expand(out_features, groups)
            else:
                reps = groups // self.weight_scale.shape[1]
                scale = self.weight_scale.repeat_interleave(reps, dim=1)
                zero_point = self.weight_zero_point.repeat_interleave(reps, dim=1)
            # the kernel computes (nibble - 8) * scale + zero; ours is (nibble - offset - zero_point) * scale
            additive = (8 - offset - zero_point) * scale
            self._int4_scale_zero = torch.stack([scale.t(), additive.t()], dim=-1).contiguous()

    def kernel(self) -> str:
        """Which kernel serves the quantized-activation rows (for reports)."""
        if self.act_mode is None:
            return self.weight_only_kernel()
        if self._w_int8 is not None:
            return "int8 GEMM (torch._int_mm)"
        return f"activations rounded in float + {self.weight_only_kernel()}"

    def weight_only_kernel(self) -> str:
        if self._int4_group is not None:
            return f"int4 packed (aten._weight_int4pack_mm_for_cpu, group {self._int4_group})"
        if self._w_int8 is not None:
            return "int8 weight-only (aten._weight_int8pack_mm)"
        return "dequantized per call"

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] in float -> [rows, out] with the integer weight and unquantized activations."""
        if self._int4_group is not None:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self._int4_pack, self._int4_group, self._int4_scale_zero.to(x.dtype))
        if self._w_int8 is not None:
            out = torch.ops.aten._weight_int8pack_mm(x, self._w_int8, self._w_rowscale.to(x.dtype))
            if self._w_zero is not None:
                out = out - x.sum(dim=1, keepdim=True) * (self._w_zero * self._w_rowscale).to(x.dtype)
            return out
        return F.linear(x, self.quantized_weight().dequantize(x.dtype))

    def _act_grid(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the activation grid, the simulator's rule for each mode."""
        if self.act_mode == "static":
            return self.act_scale, self.act_zero_point
        if self.act_mode == "dynamic-token":
            return scale_zero_point(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True),
                                    self.act_bits, self.act_symmetric)
        ranged = x if keep is None else x.masked_fill(keep.unsqueeze(-1), 0.0)
        return scale_zero_point(ranged.amin(), ranged.amax(), self.act_bits, self.act_symmetric)

    def _quantized_rows(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [rows, in] -> [rows, out] with quantized activations."""
        scale, zero_point = self._act_grid(x, keep)
        qmin, qmax = qrange(self.act_bits, self.act_symmetric)
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        if self._w_int8 is None:
            return self._weight_only((q - zero_point) * scale)
        shift = 0 if self.act_symmetric else UINT8_SHIFT
        q_int8 = (q - shift).to(torch.int8)
        acc = torch._int_mm(q_int8, self._w_int8.t())
        act_zero = zero_point.round().to(torch.int32) - shift  # [] or [rows, 1]
        if not self.act_symmetric:
            acc = acc - act_zero * self._w_colsum
        if self._w_zero is not None:
            rowsum = q_int8.to(torch.int32).sum(dim=1, keepdim=True)
            acc = acc - rowsum * self._w_zero + self.in_features * act_zero * self._w_zero
        return acc.to(x.dtype) * (scale.to(x.dtype) * self._w_rowscale.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.act_mode is None:
            out = self._weight_only(rows)
        else:
            keep = None if self.keep is None else self.keep.mask_for(x)
            flat_keep = None if keep is None else keep.reshape(-1)
            out = self._quantized_rows(rows, flat_keep)
            if flat_keep is not None and bool(flat_keep.any()):
                kept = flat_keep.nonzero().squeeze(1)
                out = out.index_copy(0, kept, self._weight_only(rows.index_select(0, kept)))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        weight = f"int{self.bits} {self.granularity}" + (f" {self.group_size}" if self.group_size else "")
        act = "fp" if self.act_mode is None else f"int{self.act_bits} {self.act_mode}"
        return f"in={self.in_features}, out={self.out_features}, weights={weight}, act={act}, kernel={self.kernel()}"


def _activation_fields(activations: Any | None) -> tuple[int | None, str | None, bool | None]:
    if activations is None:
        return None, None, None
    mode = getattr(activations, "mode", None)
    if mode not in ACTIVATION_MODES:
        raise SinkquantError(f"activations.mode={mode!r} is not valid; valid: {', '.join(ACTIVATION_MODES)}")
    return int(activations.bits), mode, bool(activations.symmetric)


def convert_to_native(model: nn.Module) -> list[str]:
    """Replace every quantized layer (a module whose `.qweight` is a QuantizedWeight) by a NativeLinear, in
    place; returns the converted names."""
    names = [name for name, module in model.named_modules() if isinstance(getattr(module, "qweight", None),
                                                                             QuantizedWeight)]
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NativeLinear.from_quant_linear(model.get_submodule(name)))
    return names


def native_from_simulated(simulated: nn.Module, original: nn.Module) -> list[str]:
    """Bridge from the current simulator (`quantize_model`): each QuantLinear of `simulated` becomes a
    NativeLinear whose integer weight is round-to-nearest of the same layer's weight in `original` (the
    unquantized model it was copied from; bit-exact with the simulator's fake-quantized weight), keeping the
    calibrated activation scales and the shared keep state. In place; returns the converted names."""
    from sinkquant.quant.qweight import quantize_rtn
    from sinkquant.quant.simulate import QuantLinear

    names = [name for name, module in simulated.named_modules() if isinstance(module, QuantLinear)]
    for name in names:
        layer = simulated.get_submodule(name)
        spec = layer.weights_spec
        if spec is None:
            raise SinkquantError(f"{name}: the native backend needs quantized weights (scheme.weights is None)")
        weight = original.get_submodule(name).weight
        qweight = quantize_rtn(weight, spec.bits, spec.granularity, spec.group_size, spec.symmetric)
        native = NativeLinear(qweight, layer.bias, layer.activations, layer.act_scale, layer.act_zero_point,
                              layer.keep)
        parent, _, child = name.rpartition(".")
        setattr(simulated.get_submodule(parent), child, native)
    return names
