"""SmoothQuant migration (metrics.md item 11): move activation outliers into the weights, channel by channel,
through the norm in front of each Linear group, or through up_proj into down_proj (the adapter lists where).
Sink tokens are left out of the activation statistics, or their peaks alone would set every scale."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from sinkquant.quant.keep import KeepState, keep_hooks
from sinkquant.steps.base import Stage, Step, StepConfig, register

if TYPE_CHECKING:
    from sinkquant.engine.session import Session


class SmoothConfig(StepConfig):
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha)."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)


@register
class Smooth(Step):
    name = "smooth"
    Config = SmoothConfig
    stage = Stage.TRANSFORM
    needs = ("activations",)

    @torch.no_grad()
    def apply(self, session: Session) -> dict[str, Any]:
        """Returns the largest migration scale per group, for the report."""
        adapter, model = session.loaded.adapter, session.model
        layers = adapter.decoder_layers(model)
        # The maxima depend on the model before smoothing (the steps run so far, e.g. a rotation), its prefix,
        # kept positions and windows, not on alpha: the auto search's alpha candidates share one measurement
        # through the session's memo.
        if session.memo is None:
            act_max = self._activation_maxima(session)
        else:
            prefix = tuple(session.prefix.ids) if session.prefix is not None else ()
            key = ("smooth", json.dumps(session.applied, sort_keys=True), prefix, session.keep,
                   session.calibration.shape, hashlib.sha256(session.calibration.cpu().numpy().tobytes()).hexdigest())
            if key not in session.memo:
                session.memo[key] = self._activation_maxima(session)
            act_max = session.memo[key]

        largest: dict[str, float] = {}
        alpha = self.config.alpha
        for index, layer in enumerate(layers):
            for source_name, targets in adapter.smooth_groups:
                source = layer.get_submodule(source_name)
                linears = [layer.get_submodule(t) for t in targets]
                w_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)
                scale = (act_max[(index, source_name)].pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
                _divide_output(source, scale, adapter.norm_weight_offset)
                for lin in linears:
                    lin.weight.mul_(scale)
                largest[f"{adapter.layers}.{index}.{source_name}"] = float(scale.max())
        return {"alpha": alpha, "largest_scale": largest}

    @staticmethod
    def _activation_maxima(session: Session) -> dict[tuple[int, str], torch.Tensor]:
        """Per (layer, group source): each input channel's largest |x| over the calibration windows."""
        adapter, model = session.loaded.adapter, session.model
        layers = adapter.decoder_layers(model)
        keep = KeepState(session.keep)
        act_max: dict[tuple[int, str], torch.Tensor] = {}

        def make_hook(key: tuple[int, str]):
            def hook(_module, args):
                x = args[0]
                mask = keep.mask_for(x)
                flat = x.abs() if mask is None else x.abs().masked_fill(mask.unsqueeze(-1), 0.0)
                current = flat.reshape(-1, x.shape[-1]).amax(dim=0)
                act_max[key] = current if key not in act_max else torch.maximum(act_max[key], current)

            return hook

        handles = [layer.get_submodule(targets[0]).register_forward_pre_hook(make_hook((index, source)))
                   for index, layer in enumerate(layers) for source, targets in adapter.smooth_groups]
        try:
            with keep_hooks(model, adapter, keep):
                for kwargs in session.batches():
                    model(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return act_max


def _divide_output(source: torch.nn.Module, scale: torch.Tensor, norm_offset: float) -> None:
    """Divide the source's output channels by `scale`: a Linear's weight rows, or a norm's gain."""
    if isinstance(source, torch.nn.Linear):
        source.weight.div_(scale[:, None])
    else:
        source.weight.copy_((source.weight + norm_offset) / scale - norm_offset)
    if getattr(source, "bias", None) is not None:
        source.bias.div_(scale)
