"""Calibration observers for static activation ranges. Each accumulates over calibration batches and skips
positions marked in a boolean `keep` mask (the sink tokens), so one huge kept token cannot stretch the
range that every other token is quantized with."""

from __future__ import annotations

import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.primitives import fake_quant_range

# Values sampled per batch by the percentile / MSE observers: enough for a 99.99th percentile
# (~3 values above it per batch) at bounded memory over hundreds of layers.
SAMPLES_PER_BATCH = 32768
MSE_GRID = 100


def _unkept_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """[..., hidden] -> [n_unkept_tokens, hidden]."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    if keep is None:
        return rows
    if keep.shape != x.shape[:-1]:
        raise SinkquantError(f"keep mask shape {tuple(keep.shape)} does not match activations {tuple(x.shape[:-1])}")
    return rows[~keep.reshape(-1)] if keep.any() else rows  # the mask's copy only where it removes a row


class Observer:
    """Exact running min/max over unkept values; subclasses refine the range at `range()` time."""

    def __init__(self, bits: int, symmetric: bool) -> None:
        self.bits = bits
        self.symmetric = symmetric
        self.count = 0
        self.xmin: torch.Tensor | None = None
        self.xmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Statistics stay on the activations' device (no host copy per batch)."""
        rows = _unkept_rows(x, keep)
        if rows.numel() == 0:
            return
        self.count += rows.numel()
        low, high = rows.amin(), rows.amax()
        self.xmin = low if self.xmin is None else torch.minimum(self.xmin, low)
        self.xmax = high if self.xmax is None else torch.maximum(self.xmax, high)
        self._collect(rows)

    def _collect(self, rows: torch.Tensor) -> None:
        """Hook for observers that need more than the extremes."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise SinkquantError(
                "observer saw no values: no calibration batch was run, or every position was kept in full precision"
            )
        return self._range()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.xmin.clone(), self.xmax.clone()


class AbsmaxObserver(Observer):
    """The full observed range (min/max; the symmetric grid then uses max |x|)."""


class _SampledObserver(Observer):
    """Keeps a seeded uniform sample of unkept values per batch, for statistics that need the distribution."""

    def __init__(self, bits: int, symmetric: bool) -> None:
        super().__init__(bits, symmetric)
        self._samples: list[torch.Tensor] = []
        self._generator = torch.Generator().manual_seed(0)

    def _collect(self, rows: torch.Tensor) -> None:
        flat = rows.reshape(-1)
        if flat.numel() > SAMPLES_PER_BATCH:
            pick = torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=self._generator)
            flat = flat[pick.to(flat.device)]
        self._samples.append(flat)

    def sample(self) -> torch.Tensor:
        return torch.cat(self._samples)


class PercentileObserver(_SampledObserver):
    """Clips at the given percentile of |x| (symmetric) or at the (100-p, p) percentiles of x."""

    def __init__(self, bits: int, symmetric: bool, percentile: float = 99.99) -> None:
        super().__init__(bits, symmetric)
        self.percentile = percentile

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.sample()
        q = self.percentile / 100.0
        if self.symmetric:
            top = torch.quantile(values.abs(), q)
            return -top, top
        return torch.quantile(values, 1.0 - q), torch.quantile(values, q)


class MSEObserver(_SampledObserver):
    """Searches a shrink factor of the observed range that minimises the quantization MSE of the sample."""

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.sample()
        best, best_err = (self.xmin, self.xmax), float("inf")
        for ratio in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID):
            lo, hi = self.xmin * ratio, self.xmax * ratio
            err = float(torch.mean((values - fake_quant_range(values, lo, hi, self.bits, self.symmetric)) ** 2))
            if err < best_err:
                best, best_err = (lo, hi), err
        return best[0].clone(), best[1].clone()


def make_observer(name: str, bits: int, symmetric: bool, percentile: float = 99.99) -> Observer:
    if name == "absmax":
        return AbsmaxObserver(bits, symmetric)
    if name == "percentile":
        return PercentileObserver(bits, symmetric, percentile)
    if name == "mse":
        return MSEObserver(bits, symmetric)
    raise SinkquantError(f"observer={name!r} is not valid; valid: absmax, percentile, mse")
