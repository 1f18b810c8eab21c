"""SmoothQuant migration (metrics.md item 11): move activation outliers into the weights, channel by channel,
through the norm in front of each Linear group, or through up_proj into down_proj (the adapter lists where).
Sink tokens are left out of the activation statistics, or their peaks alone would set every scale.

One alpha suits every group only roughly: a group may name its own (`layers`), or the step chooses it from
`layer_grid`, per group, as the value whose quantized Linears (the scheme's weights, rounded to nearest, and its
activations) best reproduce the group's fp outputs on calibration tokens, the layer-wise alpha of Intel Neural
Compressor's SmoothQuant. The step's record lists the choices, so a recipe can name them and skip the search."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.keep import KeepState, keep_hooks
from sinkquant.quant.primitives import scale_zero_point
from sinkquant.quant.qweight import quantize_rtn
from sinkquant.quant.simulate import QuantLinear, fake_quant_activation
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import SmoothConfig, SmoothSpec

__all__ = ["Smooth", "SmoothConfig"]

if TYPE_CHECKING:
    from sinkquant.quant.scheme import Scheme
    from sinkquant.steps.session import Session

# Calibration rows per group the layer-wise choice scores on (sink rows left out), sampled with a fixed seed.
LAYER_SAMPLES = 128


@register
class Smooth(SmoothSpec, Step):
    @torch.no_grad()
    def apply(self, session: Session) -> dict[str, Any]:
        """Returns each group's alpha and largest migration scale, for the report."""
        adapter, model, cfg = session.loaded.adapter, session.model, self.config
        layers = adapter.decoder_layers(model)
        groups = {f"{adapter.layers}.{index}.{source}": (layer, source, targets)
                  for index, layer in enumerate(layers) for source, targets in adapter.smooth_groups}
        unknown = sorted(set(cfg.layers) - set(groups))
        if unknown:
            raise SinkquantError(f"smooth.layers: {unknown[0]!r} is not a smoothing group of this model; valid: "
                                 f"{len(groups)} names like {next(iter(groups))!r} (the record's largest_scale keys)")
        chosen = {name for name in groups if name not in cfg.layers} if cfg.layer_grid else set()
        # Under a memo (the auto search) rows are sampled with the maxima, so its layer-wise candidate reuses them
        act_max, rows = self._statistics(session, LAYER_SAMPLES if chosen or session.memo is not None else 0)

        alphas = {name: cfg.layers.get(name, cfg.alpha) for name in groups}
        largest: dict[str, float] = {}

        def smooth_layer(index: int, layer: torch.nn.Module) -> None:
            """One layer's groups (their weights and statistics are the layer's own): alphas first, then scales.
            Streaming reads a layer more than once; each read gives the same values."""
            names = [(f"{adapter.layers}.{index}.{source}", source, targets)
                     for source, targets in adapter.smooth_groups]
            for name, _, targets in names:
                if name in chosen:
                    alphas[name] = _least_error_alpha(rows[name], act_max[name],
                                                      [layer.get_submodule(t) for t in targets], cfg.layer_grid,
                                                      session.scheme)
            for name, source, targets in names:
                linears = [layer.get_submodule(t) for t in targets]
                # fp32 for a bf16 model: a bf16 pow loses the scale's low bits (fp32 models: unchanged)
                scale = _migration_scale(act_max[name].float(), _weight_max(linears).float(), alphas[name])
                _divide_output(layer.get_submodule(source), scale, adapter.norm_weight_offset)
                for lin in linears:
                    lin.weight.mul_(scale)
                largest[name] = float(scale.max())

        session.transform_layers(smooth_layer)
        record: dict[str, Any] = {"alpha": cfg.alpha, "largest_scale": largest}
        if cfg.layers or chosen:
            record["alphas"] = alphas
        return record

    @staticmethod
    def _statistics(session: Session, samples: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Activation maxima (and `samples` rows) per group. They depend on the model before smoothing (the steps
        run so far, e.g. a rotation), its prefix, kept positions and windows, not on alpha: the auto search's
        candidates share one measurement through the session's memo."""
        if session.memo is None:
            return Smooth._measure(session, samples)
        prefix = tuple(session.prefix.ids) if session.prefix is not None else ()
        key = ("smooth", json.dumps(session.applied, sort_keys=True), prefix, session.keep, samples,
               session.calibration.shape, hashlib.sha256(session.calibration.cpu().numpy().tobytes()).hexdigest())
        if key not in session.memo:
            session.memo[key] = Smooth._measure(session, samples)
        return session.memo[key]

    @staticmethod
    def _measure(session: Session, samples: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per group, by its source's name: each input channel's largest |x| over the calibration windows, and
        up to `samples` of the rows, drawn with a fixed seed (sink rows left out of both)."""
        adapter, model = session.loaded.adapter, session.model
        layers = adapter.decoder_layers(model)
        keep = KeepState(session.keep)
        act_max: dict[str, torch.Tensor] = {}
        rows: dict[str, list[torch.Tensor]] = {}
        generator = torch.Generator().manual_seed(0)

        def make_hook(key: str):
            def hook(_module, args):
                x = args[0]
                mask = keep.mask_for(x)
                flat = x.abs() if mask is None else x.abs().masked_fill(mask.unsqueeze(-1), 0.0)
                current = flat.reshape(-1, x.shape[-1]).amax(dim=0)
                act_max[key] = current if key not in act_max else torch.maximum(act_max[key], current)
                if samples:
                    unkept = x.reshape(-1, x.shape[-1]) if mask is None else x[~mask]
                    pick = torch.randperm(unkept.shape[0], generator=generator)[:samples].to(unkept.device)
                    rows.setdefault(key, []).append(unkept[pick].float())

            return hook

        handles = [layer.get_submodule(targets[0]).register_forward_pre_hook(
                       make_hook(f"{adapter.layers}.{index}.{source}"))
                   for index, layer in enumerate(layers) for source, targets in adapter.smooth_groups]
        try:
            with keep_hooks(model, adapter, keep):
                for kwargs in session.batches():
                    model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        picked = {}
        for key, parts in rows.items():
            stacked = torch.cat(parts)
            picked[key] = stacked[torch.randperm(stacked.shape[0], generator=generator)[:samples].to(stacked.device)]
        return act_max, picked


def _weight_max(linears: list[torch.nn.Module]) -> torch.Tensor:
    """Each input channel's largest |w| over the group's Linears (from column maxima and minima: no weight-sized
    |w| temporary, the same values)."""
    return torch.stack([torch.maximum(lin.weight.amax(dim=0), lin.weight.amin(dim=0).neg()).abs()
                        for lin in linears]).amax(dim=0)


def _migration_scale(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return (act_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


def _least_error_alpha(x: torch.Tensor, act_max: torch.Tensor, linears: list[torch.nn.Module],
                       grid: tuple[float, ...], scheme: Scheme) -> float:
    """The grid's alpha with the least ||Q(x / s) Q(W s)^T - x W^T||^2 summed over the group's Linears: weights
    rounded to nearest on the scheme's grid (GPTQ would round better, alike for every alpha), activations on the
    static range the smoothed maxima give (absmax observer) or the scheme's dynamic one."""
    exact = [x @ lin.weight.float().t() for lin in linears]
    spec, weights, w_max = scheme.activations, scheme.weights, _weight_max(linears).float()
    errors = []
    for alpha in grid:
        scale = _migration_scale(act_max.float(), w_max, alpha)
        peak = (act_max.float() / scale).amax()
        act_scale, zero_point = scale_zero_point(-peak, peak, spec.bits, spec.symmetric)
        xq = fake_quant_activation(x / scale, spec, None, act_scale, zero_point)
        error = 0.0
        for lin, out in zip(linears, exact, strict=True):
            w = lin.weight.float() * scale
            if weights is not None:
                w = quantize_rtn(w, weights.bits, weights.granularity, weights.group_size,
                                 weights.symmetric).dequantize(torch.float32)
            error += float((xq @ w.t() - out).pow(2).sum())
        errors.append(error)
    return float(grid[min(range(len(grid)), key=errors.__getitem__)])


def _divide_output(source: torch.nn.Module, scale: torch.Tensor, norm_offset: float) -> None:
    """Divide the source's output channels by `scale`: a Linear's weight rows (a QuantLinear's too: streaming
    smooths a layer as it is read, after its Linears were swapped), or a norm's gain."""
    if isinstance(source, torch.nn.Linear | QuantLinear):
        source.weight.div_(scale[:, None])
    else:
        source.weight.copy_((source.weight + norm_offset) / scale - norm_offset)
    if getattr(source, "bias", None) is not None:
        source.bias.div_(scale)
