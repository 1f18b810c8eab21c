"""The integer form of a Linear weight: what the artifact stores, what every backend reads (the simulator
dequantizes it on the fly, the native backend feeds it to integer kernels, the export writes it as is), and
what every weight quantizer (round-to-nearest, GPTQ) produces."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.primitives import qrange, scale_zero_point

GRANULARITIES = ("tensor", "channel", "group")


@dataclass
class QuantizedWeight:
    """`qweight` [out, in] holds grid values (int8 symmetric, uint8 asymmetric; int4 values unpacked in the same
    dtypes). `scale` / `zero_point` are float32 and broadcast per tensor ([]), per output row ([out, 1]) or per
    group of `group_size` input columns ([out, in // group_size]). Dequantized: (q - zero_point) * scale."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    granularity: str
    group_size: int | None
    symmetric: bool

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def _expand(self, value: torch.Tensor) -> torch.Tensor:
        if self.granularity != "group":
            return value
        return value.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the simulator multiplies with; bit-exact with `quantize_dequantize` on the same grid."""
        # one weight-sized temporary, worked on in place, in the dtype the out-of-place arithmetic would promote
        # to (float64 scales of a model in float64 keep their precision)
        grid = (self.scale,) if self.symmetric else (self.scale, self.zero_point)
        q = self.qweight.to(functools.reduce(torch.promote_types, (g.dtype for g in grid), torch.float32), copy=True)
        if not self.symmetric:  # symmetric grids have zero points of 0: skip a pass over the weight
            q.sub_(self._expand(self.zero_point))
        return q.mul_(self._expand(self.scale)).to(dtype)

    def packed(self) -> torch.Tensor:
        """int4 values two per byte (low nibble first, offset to 0..15) for storage; int8 as is."""
        if self.bits > 4:
            return self.qweight
        offset = 0 if not self.symmetric else 2 ** (self.bits - 1)
        nibbles = (self.qweight.to(torch.int16) + offset).to(torch.uint8)
        if nibbles.shape[-1] % 2:
            raise SinkquantError(f"int4 packing needs an even input width, got {nibbles.shape[-1]}")
        return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)

    @staticmethod
    def unpack(packed: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
        """Inverse of `packed`."""
        if bits > 4:
            return packed
        offset = 0 if not symmetric else 2 ** (bits - 1)
        low, high = (packed & 0x0F).to(torch.int16), (packed >> 4).to(torch.int16)
        values = torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1) - offset
        return values.to(torch.int8 if symmetric else torch.uint8)


def storage_dtype(bits: int, symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


def _minmax(weight: torch.Tensor, granularity: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if granularity == "tensor":
        return weight.amin(), weight.amax()
    if granularity == "channel":
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    out_features, in_features = weight.shape
    grouped = weight.reshape(out_features, in_features // group_size, group_size)
    return grouped.amin(dim=2), grouped.amax(dim=2)


def grid_params(
    weight: torch.Tensor, bits: int, granularity: str, group_size: int | None, symmetric: bool,
    clip: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the min/max grid (shrunk by `clip`, a ratio per row or one for all)."""
    if granularity not in GRANULARITIES:
        raise SinkquantError(f"weight granularity={granularity!r} is not valid; valid: {', '.join(GRANULARITIES)}")
    if granularity == "group" and (not group_size or weight.shape[1] % group_size):
        raise SinkquantError(f"group_size={group_size} does not divide the input width {weight.shape[1]}; "
                             f"valid: a divisor of {weight.shape[1]}")
    xmin, xmax = _minmax(weight, granularity, group_size)
    return scale_zero_point(xmin * clip, xmax * clip, bits, symmetric)


def quantize_with(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, granularity: str,
    group_size: int | None, symmetric: bool,
) -> QuantizedWeight:
    """Round `weight` onto a given grid (round-to-nearest, clamped)."""
    qmin, qmax = qrange(bits, symmetric)
    spec = QuantizedWeight(torch.empty(0), scale, zero_point, bits, granularity, group_size, symmetric)
    q = (weight / spec._expand(scale)).round_()  # in place from here: one weight-sized temporary
    if not symmetric:
        q.add_(spec._expand(zero_point))
    spec.qweight = q.clamp_(qmin, qmax).to(storage_dtype(bits, symmetric))
    return spec


def quantize_rtn(
    weight: torch.Tensor, bits: int, granularity: str, group_size: int | None = None, symmetric: bool = True
) -> QuantizedWeight:
    """Round-to-nearest on the weight's own min/max grid: the default weight quantizer."""
    weight = weight.detach().float()
    scale, zero_point = grid_params(weight, bits, granularity, group_size, symmetric)
    return quantize_with(weight, scale, zero_point, bits, granularity, group_size, symmetric)
