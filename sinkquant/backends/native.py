"""The native backend: a Linear that stores integer weights (int8; int4 packed two per byte) and runs CPU
integer kernels, computing the same numbers as the simulator up to float rounding.

Kernels (measured by eval/bench_kernels.py on SmolLM2's Linear shapes), all integer where the grid allows:
- quantized activations, weights per tensor or per row (int8, or int4 unpacked to int8 at load): activations
  rounded onto their grid (static calibrated scale, or a dynamic one per token / per tensor), then
  `torch._int_mm` (int8 x int8 -> int32, oneDNN on CPU). Zero points are corrected exactly in int32 with the
  weight's column sums and the activation's row sums, then one float multiply by the two scales.
- float activations (W8A16, exception layers, kept rows) against a per-row weight: the activations are split
  into three int8 limbs (24 bits, float32's mantissa) and go through the same `torch._int_mm`. torch's own
  weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) were measured 30-70x
  slower than fp32 F.linear with fp32 activations on this CPU build, so they are not used.
- group-wise weights (W4A16 group 64): no integer kernel here; the weight is dequantized for each call only
  (activations, when quantized, are rounded onto their grid in float first: same numbers, no int8 GEMM).

Kept positions (sink tokens, prefix positions) skip activation quantization: their rows go through the
weight-only path, exactly as the simulator's `torch.where(keep, x, fake_quant(x))` does.

Layers that read the same norm output with the same activation grid (q/k/v, gate/up: the adapter's
`norm_readers`) run as one `SiblingGroup`: the input is quantized once and one GEMM covers their concatenated
int8 weights. Integer accumulation is exact and every later step is elementwise, so each layer's output is
bit-identical to running it alone; the members' stored weights become row slices of the fused one (no copy)."""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sinkquant.adapters import adapter_for
from sinkquant.errors import SinkquantError
from sinkquant.quant.embeddings import int8_rows
from sinkquant.quant.primitives import MIN_SCALE, qrange, scale_zero_point
from sinkquant.quant.qweight import QuantizedWeight
from sinkquant.quant.scheme import ActivationScheme
from sinkquant.quant.simulate import carry_transforms

ACTIVATION_MODES = ("static", "dynamic-token", "dynamic-tensor")
# Float activations against an int8 weight: three int8 limbs, each the rounding residual of the one before,
# carry 24 bits (float32's mantissa), so weight-only layers and kept rows still run integer GEMMs.
LIMBS = 3
# Offset that maps an unsigned 8-bit grid onto int8, which is what the int8 GEMM takes.
UINT8_SHIFT = 128
# SmolLM2's lm_head (576 -> 49152, 2 threads), ms per call by rows: F.linear 11.0 / 34.6 / 62.0 / 208.5 and the
# int8 limbs 2.4 / 28.0 / 73.6 / 404.6 at 1 / 64 / 128 / 512 rows; the integer kernel wins up to 64.
INT8_HEAD_MAX_ROWS = 64


def limb_matmul(x: torch.Tensor, w_int8: torch.Tensor, rowscale: torch.Tensor, w_zero: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Float x [rows, in] times an int8 weight [out, in] with one scale per row (and an int32 zero point where
    asymmetric): x as LIMBS int8 limbs, each the rounding residual of the one before, in one integer GEMM."""
    residual = x
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=MIN_SCALE) / 127
    limbs, scales = [], []
    for _ in range(LIMBS):
        q = torch.round(residual / scale).clamp_(-127, 127)
        limbs.append(q.to(torch.int8))
        scales.append(scale)
        residual = residual - q * scale
        scale = scale / 254  # the residual is at most half a step: it fills the next limb's [-127, 127]
    # Stacked, the limbs read the weight once (a decode step's lm_head: 2.7 ms, three GEMMs 4.6 ms).
    acc = torch._int_mm(torch.cat(limbs), w_int8.t()).split(x.shape[0])
    out = acc[0] * scales[0]
    for part, limb_scale in zip(acc[1:], scales[1:], strict=True):
        out += part * limb_scale
    out *= rowscale.to(x.dtype)
    if w_zero is not None:
        out -= x.sum(dim=1, keepdim=True) * (w_zero * rowscale).to(x.dtype)
    return out


class Keep(Protocol):
    """What the module needs from the keep state shared by every layer (sinkquant.quant.keep.KeepState)."""

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None: ...


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
        for name in ("_w_int8", "_w_colsum", "_w_rowscale", "_w_zero", "_static_out_scale"):
            self.register_buffer(name, None, persistent=False)
        self.group: SiblingGroup | None = None  # set by convert_to_native
        self.register_load_state_dict_post_hook(lambda module, _keys: module.reloaded())
        self.prepare()

    def reloaded(self) -> None:
        """New integers or scales were loaded in place: derive the kernels again, the group's fused ones too."""
        self.prepare()
        if self.group is not None:
            self.group.invalidate()

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """Refuse a missing, mis-shaped or mis-typed integer tensor or scale with one line naming it (an artifact
        of another model or scheme), instead of torch's multi-line size-mismatch report."""
        for name, expected in self._buffers.items():
            if expected is None or name not in self._persistent_names():
                continue
            got = state_dict.get(prefix + name)
            if got is None:
                raise SinkquantError(f"tensor {prefix + name} is missing; expected {expected.dtype} "
                                     f"{tuple(expected.shape)} (an artifact of this model and scheme)")
            if got.shape != expected.shape or got.dtype != expected.dtype:
                raise SinkquantError(f"tensor {prefix + name} is {got.dtype} {tuple(got.shape)}, expected "
                                     f"{expected.dtype} {tuple(expected.shape)} (an artifact of another model or "
                                     "scheme?)")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _persistent_names(self) -> set[str]:
        return set(self._buffers) - self._non_persistent_buffers_set

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
        out_features = self.out_features
        if self.granularity != "group":
            # int8 values for the GEMMs; a symmetric int8 weight is used as stored (no copy).
            values = qweight.qweight
            if not self.symmetric:
                values = (values.to(torch.int16) - UINT8_SHIFT).to(torch.int8)
            self._w_int8 = values.contiguous()
            self._w_colsum = values.to(torch.int32).sum(dim=1)
            self._w_rowscale = self.weight_scale.expand(out_features, 1).reshape(out_features).contiguous()
            zero = self.weight_zero_point.expand(out_features, 1).reshape(out_features)
            self._w_zero = None if self.symmetric else (zero - UINT8_SHIFT).round().to(torch.int32)
            if self.act_mode == "static":  # one multiply per output at run time (fewer ops per decode step)
                self._static_out_scale = self.act_scale * self._w_rowscale

    def kernel(self) -> str:
        """Which kernel serves the quantized-activation rows (for reports)."""
        if self.act_mode is None:
            return self.weight_only_kernel()
        if self._w_int8 is not None:
            return "int8 GEMM (torch._int_mm)"
        return f"activations rounded in float + {self.weight_only_kernel()}"

    def weight_only_kernel(self) -> str:
        if self._w_int8 is not None:
            return f"int8 GEMM on {LIMBS} int8 limbs of the float activations (torch._int_mm)"
        return "weight dequantized per call (F.linear)"

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] in float -> [rows, out] with the integer weight and unquantized activations."""
        if self._w_int8 is None:
            return F.linear(x, self.quantized_weight().dequantize(x.dtype))
        return limb_matmul(x, self._w_int8, self._w_rowscale, self._w_zero)

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
        q = torch.div(x, scale).round_()  # the simulator's rounding, in place
        if not self.act_symmetric:  # a symmetric grid's zero point is 0
            q.add_(zero_point)
        q.clamp_(qmin, qmax)
        if self._w_int8 is None:
            return self._weight_only((q - zero_point) * scale)
        shift = 0 if self.act_symmetric else UINT8_SHIFT
        q_int8 = (q.sub_(shift) if shift else q).to(torch.int8)
        acc = torch._int_mm(q_int8, self._w_int8.t())
        act_zero = zero_point.round().to(torch.int32) - shift  # [] or [rows, 1]
        if not self.act_symmetric:
            acc -= act_zero * self._w_colsum
        if self._w_zero is not None:
            rowsum = q_int8.to(torch.int32).sum(dim=1, keepdim=True)
            acc -= rowsum * self._w_zero - self.in_features * act_zero * self._w_zero
        out_scale = self._static_out_scale if self.act_mode == "static" else scale * self._w_rowscale
        return acc * out_scale.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
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
            out += self.bias.to(out.dtype)
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


class SiblingGroup:
    """NativeLinear layers that read one input tensor with one activation grid. The first member called with
    an input runs the fused layer (one activation quantization, one GEMM over the concatenated weights) and
    keeps the result until every other member has taken its columns; an input the group has not seen, or one
    changed in place since, is computed afresh, so calling a member alone stays correct."""

    def __init__(self, members: list[NativeLinear]) -> None:
        self.members = members
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for member in members:
            self.bounds.append((start, start + member.out_features))
            start += member.out_features
        self.fused: NativeLinear | None = None
        self._views: list[int] = []  # the members' qweight data pointers into the fused storage
        self._input: torch.Tensor | None = None
        self._version: int | None = None
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def invalidate(self) -> None:
        """A member's integers or scales changed in place: rebuild the fused layer, and drop an output computed
        with the old ones that siblings had yet to take."""
        self.fused = None
        self._input = self._output = None
        self._waiting = set()

    @staticmethod
    def fusable(members: list[NativeLinear]) -> bool:
        """Same input width, integer kernel on symmetric int8 weights, activation grid, keep state and bias
        presence: then the fused layer computes each member's numbers exactly."""
        first = members[0]
        same = all(
            m.in_features == first.in_features and m.bits == first.bits and m.symmetric and m._w_int8 is not None
            and (m.act_bits, m.act_mode, m.act_symmetric) == (first.act_bits, first.act_mode, first.act_symmetric)
            and m.keep is first.keep and (m.bias is None) == (first.bias is None)
            for m in members)
        if not same or first.bits <= 4 or len(members) < 2:
            return False
        return first.act_mode != "static" or all(
            torch.equal(m.act_scale, first.act_scale) and torch.equal(m.act_zero_point, first.act_zero_point)
            for m in members)

    @torch.inference_mode(False)  # normal tensors even when first called under inference_mode: loads copy into them
    @torch.no_grad()
    def _build(self) -> NativeLinear:
        """The fused layer; each member's stored weight becomes a row slice of its weight (no second copy)."""
        members, first = self.members, self.members[0]
        weights = [m.quantized_weight() for m in members]
        rows = [w.scale.expand(m.out_features, 1) if w.granularity == "tensor" else w.scale
                for w, m in zip(weights, members, strict=True)]
        qweight = QuantizedWeight(torch.cat([w.qweight for w in weights]), torch.cat(rows),
                                  torch.zeros(sum(m.out_features for m in members), 1), first.bits, "channel", None,
                                  True)
        activations = None if first.act_mode is None else ActivationScheme(
            bits=first.act_bits, mode=first.act_mode, symmetric=first.act_symmetric)
        bias = None if first.bias is None else torch.cat([m.bias for m in members])
        fused = NativeLinear(qweight, bias, activations, first.act_scale, first.act_zero_point, first.keep)
        for member, (start, end) in zip(members, self.bounds, strict=True):
            member.qweight = fused.qweight[start:end]
            member.prepare()
        self._views = [m.qweight.data_ptr() for m in members]
        return fused

    def output(self, member: NativeLinear, x: torch.Tensor) -> torch.Tensor:
        index = self.members.index(member)
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        if self._output is not None and x is self._input and version == self._version and index in self._waiting:
            out = self._output
            self._waiting.discard(index)
            if not self._waiting:
                self._input = self._output = None
        else:
            if self.fused is None or self._views != [m.qweight.data_ptr() for m in self.members]:
                self.fused = self._build()  # first use, reloaded, or moved (e.g. .to(device))
            out = self.fused(x)
            self._input, self._version, self._output = x, version, out
            self._waiting = set(range(len(self.members))) - {index}
        start, end = self.bounds[index]
        return out[..., start:end]


class Int8Head(nn.Linear):
    """The output embedding (lm_head) on the int8 per-row grid that scheme.embeddings 'int8' rounds it to, run by
    the weight-only integer kernel for up to INT8_HEAD_MAX_ROWS rows (decode, a prefill's last logit) and as the
    float GEMM on the same rounded weight beyond (a perplexity window's 512 rows). `.weight` stays the float
    parameter (tied to the input embedding, saved and reloaded as before); the int8 values are non-persistent
    buffers derived from it, again whenever it changes or moves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("_w_int8", None, persistent=False)
        self.register_buffer("_w_rowscale", None, persistent=False)
        self._derived_from: tuple[Any, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > INT8_HEAD_MAX_ROWS * self.in_features:
            return super().forward(x)
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.device)
        if key != self._derived_from:
            with torch.inference_mode(False), torch.no_grad():
                rows = int8_rows(weight.detach().float())
                self._w_int8, self._w_rowscale = rows.qweight.contiguous(), rows.scale.reshape(-1).contiguous()
            self._derived_from = key
        out = limb_matmul(x.reshape(-1, self.in_features), self._w_int8, self._w_rowscale)
        if self.bias is not None:
            out += self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def convert_to_native(model: nn.Module, int8_head: bool = False) -> list[str]:
    """Replace every quantized layer (a module whose `.qweight` is a QuantizedWeight) by a NativeLinear, in
    place, and group the ones that read the same norm output (`SiblingGroup`); with `int8_head` (the scheme
    stores embeddings int8 per row) the lm_head runs as an `Int8Head`. Returns the converted names."""
    names = [name for name, module in model.named_modules() if isinstance(getattr(module, "qweight", None),
                                                                             QuantizedWeight)]
    for name in names:
        parent, _, child = name.rpartition(".")
        source = model.get_submodule(name)
        native = NativeLinear.from_quant_linear(source)
        carry_transforms(source, native)
        setattr(model.get_submodule(parent), child, native)
    _group_siblings(model)
    head = model.get_output_embeddings() if int8_head else None
    if type(head) is nn.Linear:
        name = next(n for n, m in model.named_modules() if m is head)
        parent, _, child = name.rpartition(".")
        native_head = Int8Head(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        native_head.weight, native_head.bias = head.weight, head.bias  # the same parameters: ties stay tied
        setattr(model.get_submodule(parent) if parent else model, child, native_head)
        names.append(name)
    return names


def native_copy(model: nn.Module) -> nn.Module:
    """`model` with its quantized layers as NativeLinear, which the exporters read: itself when it has no
    simulated quantized layers left, else a converted copy (the same integers and scales; `model` untouched)."""
    if not any(isinstance(getattr(m, "qweight", None), QuantizedWeight) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    convert_to_native(model)
    return model


def _group_siblings(model: nn.Module) -> None:
    try:
        adapter = adapter_for(model)
    except SinkquantError:  # an architecture without adapter facts still runs, layer by layer
        return
    for layer in adapter.decoder_layers(model):
        for _norm, readers in adapter.norm_readers:
            members = [layer.get_submodule(name) for name in readers]
            if all(isinstance(m, NativeLinear) and m.group is None for m in members) and SiblingGroup.fusable(members):
                group = SiblingGroup(members)
                for member in members:
                    member.group = group

