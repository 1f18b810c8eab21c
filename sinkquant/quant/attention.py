"""One attention function for everything sinkquant does inside attention, registered with transformers'
AttentionInterface: per-module transforms of (query, key, value) run in the order they were installed (a Q/K
rotation before KV quantization, say), then the module's core attention (a step such as attention calibration
may replace it; default SDPA). Composing through one function keeps steps independent of each other."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkquant.adapters import Adapter

ATTENTION_NAME = "sinkquant"
BASE_ATTENTION = "sdpa"

QKVTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor],
                        tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    for transform in getattr(module, "_sinkquant_transforms", ()):
        query, key, value = transform(module, query, key, value)
    core = getattr(module, "_sinkquant_core", None) or ALL_ATTENTION_FUNCTIONS[BASE_ATTENTION]
    return core(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _attention)
# Without a registered mask builder transformers passes no mask at all, which is wrong once a cache offsets
# the queries from the keys; reuse the base implementation's masks.
AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS[BASE_ATTENTION])


def add_transform(model: nn.Module, adapter: Adapter, make: Callable[[int, nn.Module], QKVTransform | None]) -> None:
    """Append `make(layer_index, attention_module)` to each attention module's transforms (None skips a layer)
    and switch the model to sinkquant's attention."""
    for index, attention in enumerate(adapter.attention_modules(model)):
        transform = make(index, attention)
        if transform is not None:
            attention._sinkquant_transforms = (*getattr(attention, "_sinkquant_transforms", ()), transform)
    model.set_attn_implementation(ATTENTION_NAME)


def set_core(model: nn.Module, adapter: Adapter, make: Callable[[int, nn.Module], Callable | None]) -> None:
    """Replace the core attention of chosen modules (None keeps the base one)."""
    for index, attention in enumerate(adapter.attention_modules(model)):
        core = make(index, attention)
        if core is not None:
            attention._sinkquant_core = core
    model.set_attn_implementation(ATTENTION_NAME)
