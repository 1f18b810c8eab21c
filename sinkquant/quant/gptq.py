"""GPTQ (Frantar et al., 2023): quantize a Linear weight one input column at a time and push each column's
rounding error onto the columns not yet quantized, through the inverse Hessian of the layer's inputs, so the
layer's output X W^T moves less than round-to-nearest's on the same grid.

Written in the project rather than taken from a library: llm-compressor's GPTQ (the reference followed here)
pulls heavy dependencies and pins transformers, and torchao's asserts CUDA. The algorithm is short, must run on
CPU inside sinkquant's own layer-by-layer pipeline, must skip kept (full-precision) positions when it collects
its statistics, and must produce the project's `QuantizedWeight`."""

from __future__ import annotations

import logging

import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.primitives import quantize_dequantize
from sinkquant.quant.qweight import GRANULARITIES, QuantizedWeight, grid_params, quantize_with

log = logging.getLogger(__name__)

# Clip ratios tried by the MSE search of the grid range: 1.00 down to 0.50 in steps of 0.01.
MSE_SHRINK = tuple(round(1.0 - 0.01 * k, 2) for k in range(51))
# Dampening grows tenfold per failed Cholesky factorisation, this many times at most.
DAMP_RETRIES = 6


class HessianAccumulator:
    """H = 2/n * sum over calibration rows of x x^T for one Linear's inputs (n rows), accumulated in float64
    on the inputs' device. Rows at kept positions (prefix, sink tokens: they stay in full precision and never
    meet the quantized weight's error in the same way) can be left out with a boolean mask."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, inputs: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Add the rows of `inputs` [..., in_features]; `kept` [...] is True where a row must be left out."""
        if inputs.shape[-1] != self.in_features:
            raise SinkquantError(f"Hessian inputs have width {inputs.shape[-1]}; valid: {self.in_features}")
        rows = inputs.detach().reshape(-1, self.in_features)
        if kept is not None:
            if tuple(kept.shape) != tuple(inputs.shape[:-1]):
                raise SinkquantError(f"kept mask has shape {tuple(kept.shape)}; valid: the inputs' leading "
                                     f"shape {tuple(inputs.shape[:-1])}")
            rows = rows[~kept.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        rows = rows.to(device=self.sum.device, dtype=torch.float64)
        self.sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def hessian(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H in `dtype`; float32 (what `gptq_quantize` factorises) skips a float64 copy of the sum."""
        if self.rows == 0:
            raise SinkquantError("no calibration rows reached this layer (all positions kept?); "
                                 "calibrate on windows longer than the kept positions")
        return self.sum.to(dtype, copy=True).mul_(2.0 / self.rows)


def _unit_error(weight: torch.Tensor, deq: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """Squared reconstruction error per grid unit (one value, per row, or per row and group)."""
    sq = (deq - weight) ** 2
    if granularity == "tensor":
        return sq.sum()
    if granularity == "channel":
        return sq.sum(dim=1, keepdim=True)
    return sq.reshape(weight.shape[0], -1, group_size).sum(dim=2)


def search_grid(
    weight: torch.Tensor, bits: int, granularity: str, group_size: int | None, symmetric: bool, mse_clip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The min/max grid, or with `mse_clip` the shrunk grid (one ratio per grid unit out of MSE_SHRINK) that
    minimises the weight-reconstruction error: a few large weights no longer stretch the grid of the rest."""
    scale, zero_point = grid_params(weight, bits, granularity, group_size, symmetric)
    if not mse_clip:
        return scale, zero_point
    deq = quantize_with(weight, scale, zero_point, bits, granularity, group_size, symmetric).dequantize()
    best = _unit_error(weight, deq, granularity, group_size)
    for ratio in MSE_SHRINK[1:]:
        s, z = grid_params(weight, bits, granularity, group_size, symmetric, clip=ratio)
        deq = quantize_with(weight, s, z, bits, granularity, group_size, symmetric).dequantize()
        error = _unit_error(weight, deq, granularity, group_size)
        better = error < best
        best = torch.where(better, error, best)
        scale, zero_point = torch.where(better, s, scale), torch.where(better, z, zero_point)
    return scale, zero_point


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the form GPTQ's column loop reads, in float32
    as the reference implementations compute it (float64 takes twice the time and memory: 17.7 s against 9.6 s
    for one 8192-wide Hessian on one core). `h` (the caller's float32 copy) is dampened in place. A
    factorisation that fails (H near singular: few calibration rows) is retried with tenfold dampening."""
    mean_diag = torch.diag(h).mean()
    fraction, added = damp, 0.0
    for _ in range(DAMP_RETRIES):
        h.diagonal().add_(fraction * mean_diag - added)
        added = fraction * mean_diag
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            # in place (the same values): the largest layer's Hessian is 0.27-0.8 GB in float32, two copies at once
            factor = torch.cholesky_inverse(lower, out=lower)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if int(info) == 0:
                if fraction != damp:
                    log.warning("GPTQ: Hessian not positive definite with damp=%g; used damp=%g", damp, fraction)
                return factor
        fraction *= 10
    raise SinkquantError(f"GPTQ: Hessian stays singular up to damp={fraction / 10:g}; calibrate on more rows")


def _column_grid(
    scale: torch.Tensor, zero_point: torch.Tensor, granularity: str, group_size: int | None, column: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if granularity == "tensor":
        return scale, zero_point
    index = 0 if granularity == "channel" else column // group_size
    return scale[:, index], zero_point[:, index]


def _check_args(weight: torch.Tensor, hessian: torch.Tensor, granularity: str, group_size: int | None,
                damp: float, block_size: int) -> None:
    if weight.dim() != 2:
        raise SinkquantError(f"GPTQ weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    width = weight.shape[1]
    if tuple(hessian.shape) != (width, width):
        raise SinkquantError(f"GPTQ hessian has shape {tuple(hessian.shape)}; valid: ({width}, {width})")
    if granularity not in GRANULARITIES:
        raise SinkquantError(f"weight granularity={granularity!r} is not valid; valid: {', '.join(GRANULARITIES)}")
    if granularity == "group" and (not group_size or width % group_size):
        raise SinkquantError(f"group_size={group_size} does not divide the input width {width}; "
                             f"valid: a divisor of {width}")
    if not damp > 0:
        raise SinkquantError(f"GPTQ damp={damp} is not valid; valid: a positive fraction of mean(diag H), e.g. 0.01")
    if block_size < 1:
        raise SinkquantError(f"GPTQ block_size={block_size} is not valid; valid: a positive number of columns")


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    granularity: str,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    mse_clip: bool = False,
    overwrite_hessian: bool = False,
) -> QuantizedWeight:
    """GPTQ onto the grid `bits` / `granularity` / `group_size` / `symmetric` describe; `hessian` comes from a
    `HessianAccumulator` over the layer's calibration inputs. `overwrite_hessian`: a float32 `hessian` the caller
    no longer needs is dampened in place instead of copied (0.8 GB less for an 8B model's down_proj).

    Per-tensor and per-channel grids are fixed before the pass. Groups take their grid when the pass reaches
    their first column (from the error-updated weights), except with `act_order` (columns in decreasing
    H_ii order), where every group's grid is computed up front in natural column order ("static groups"), so
    the result keeps contiguous groups. Columns no input ever reaches (H_ii = 0) quantize to zero."""
    _check_args(weight, hessian, granularity, group_size, damp, block_size)
    w = weight.detach().to(torch.float32).clone()
    out_features, width = w.shape
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=not overwrite_hessian)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    dynamic_groups = granularity == "group" and not act_order
    if dynamic_groups:
        scale = torch.empty(out_features, width // group_size, device=w.device)
        zero_point = torch.empty_like(scale)
        # Whole groups per block, so a group's grid is taken from fully updated columns.
        block_size = max(group_size, block_size // group_size * group_size)
    else:
        scale, zero_point = search_grid(w, bits, granularity, group_size, symmetric, mse_clip)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp)
    del h
    quantized = torch.zeros_like(w)
    for start in range(0, width, block_size):
        end = min(start + block_size, width)
        # The block transposed: each column is a contiguous row, and its error update one in-place rank-1
        # update (addr_) of the rows after it: 3.7x faster than outer() on the strided columns.
        block = w[:, start:end].T.contiguous()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if dynamic_groups and column % group_size == 0:
                g = column // group_size
                s, z = search_grid(block[i:i + group_size].T, bits, "channel", None, symmetric, mse_clip)
                scale[:, g:g + 1], zero_point[:, g:g + 1] = s, z
            source = int(perm[column]) if perm is not None else column
            s, z = _column_grid(scale, zero_point, granularity, group_size, source)
            q = quantize_dequantize(block[i], s, z, bits, symmetric)
            quantized[:, column] = q
            error = (block[i] - q) / hblock[i, i]
            block[i:].addr_(hblock[i, i:], error, alpha=-1)
            errors[i] = error
        w[:, end:].sub_(errors.T @ hinv[start:end, end:])
    if perm is not None:
        quantized = quantized[:, torch.argsort(perm)]
    # The pass's values lie on the grid already; quantize_with turns them back into exact integers.
    return quantize_with(quantized, scale, zero_point, bits, granularity, group_size, symmetric)
