"""SmoothQuant migration (metrics.md item 11): move activation outliers into the weights, channel by channel,
through the norm in front of each Linear group. Sink tokens are left out of the activation statistics, or their
peaks alone would set every scale."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from sinkquant.models import LoadedModel
from sinkquant.quant.keep import KeepState


@torch.no_grad()
def smooth_model(
    loaded: LoadedModel, model: torch.nn.Module, batches: Iterable[dict], keep: KeepState, alpha: float
) -> dict[str, float]:
    """`batches` are forward kwargs (input_ids, and past_key_values for a prefix). Returns the largest
    migration scale per group, for the report."""
    adapter = loaded.adapter
    layers = adapter.decoder_layers(model)
    act_max: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def make_hook(key: tuple[int, str]):
        def hook(_module, args):
            x = args[0]
            mask = keep.mask_for(x)
            flat = x.abs() if mask is None else x.abs().masked_fill(mask.unsqueeze(-1), 0.0)
            current = flat.reshape(-1, x.shape[-1]).amax(dim=0)
            act_max[key] = current if key not in act_max else torch.maximum(act_max[key], current)

        return hook

    for index, layer in enumerate(layers):
        for norm_name, targets in adapter.smooth_groups:
            handles.append(layer.get_submodule(targets[0]).register_forward_pre_hook(make_hook((index, norm_name))))
    keep_handle = model.register_forward_pre_hook(keep.hook, with_kwargs=True)
    try:
        for kwargs in batches:
            model(**kwargs)
    finally:
        for handle in [*handles, keep_handle]:
            handle.remove()

    largest: dict[str, float] = {}
    for index, layer in enumerate(layers):
        for norm_name, targets in adapter.smooth_groups:
            norm = layer.get_submodule(norm_name)
            linears = [layer.get_submodule(t) for t in targets]
            w_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)
            x_max = act_max[(index, norm_name)]
            scale = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            offset = adapter.norm_weight_offset
            norm.weight.copy_((norm.weight + offset) / scale - offset)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(scale)
            for lin in linears:
                lin.weight.mul_(scale)
            largest[f"{adapter.layers}.{index}.{norm_name}"] = float(scale.max())
    return largest
