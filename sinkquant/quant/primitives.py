"""Pure quantize-dequantize functions. Everything is simulated in floating point so any granularity, bit
width or kept-position rule can be tried on CPU; the integer grid is exact (levels are multiples of scale)."""

from __future__ import annotations

import torch

from sinkquant.errors import SinkquantError

# Smallest scale allowed: an all-zero tensor must not divide by zero.
MIN_SCALE = 1e-8


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer grid: symmetric uses the restricted range [-(2^(b-1)-1), 2^(b-1)-1] so 0 is exact and the
    grid is balanced; asymmetric uses the unsigned [0, 2^b - 1] shifted by a zero point."""
    if bits < 2 or bits > 16:
        raise SinkquantError(f"bits={bits} is not supported; valid: 2..16 (int8 and int4 are typical)")
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def scale_zero_point(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [xmin, xmax] onto the grid. The range is widened to include 0 so that
    zero (padding, ReLU outputs) is represented exactly."""
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if symmetric:
        scale = (torch.maximum(-xmin, xmax) / qmax).clamp(min=MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / (qmax - qmin)).clamp(min=MIN_SCALE)
    zero_point = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize_dequantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Round to the grid, clamp, map back: q = clamp(round(x / s) + z, qmin, qmax); x' = (q - z) * s."""
    qmin, qmax = qrange(bits, symmetric)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def fake_quant_range(
    x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Quantize-dequantize `x` with the grid of [xmin, xmax] (broadcastable to x)."""
    scale, zero_point = scale_zero_point(xmin, xmax, bits, symmetric)
    return quantize_dequantize(x, scale, zero_point, bits, symmetric)


def _minmax(x: torch.Tensor, dim: int | tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if dim is None:
        return x.amin(), x.amax()
    return x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)


def fake_quant_dynamic(x: torch.Tensor, bits: int, per_token: bool, symmetric: bool = True) -> torch.Tensor:
    """Activation fake-quant with a range taken from `x` itself: one per token (last dim reduced) or one
    for the whole tensor."""
    return fake_quant_range(x, *_minmax(x, -1 if per_token else None), bits, symmetric)
