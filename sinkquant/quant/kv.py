"""Simulated KV-cache quantization through transformers' attention interface: key/value states (post-RoPE,
the full cache including past tokens) are fake-quantized right before attention, except kept positions."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkquant.adapters import Adapter
from sinkquant.quant.keep import KeepState
from sinkquant.quant.primitives import fake_quant_range
from sinkquant.quant.scheme import KVSpec

ATTENTION_NAME = "sinkquant_kvq"
BASE_ATTENTION = "sdpa"


def fake_quant_kv(states: torch.Tensor, spec: KVSpec, keep: torch.Tensor | None) -> torch.Tensor:
    """states [batch, heads, seq, head_dim]; keep [batch, seq]. One dynamic range per (batch, head) over all
    unkept tokens ("head") or per (batch, head, token) ("token"). Quantizing past entries again each step
    is idempotent per token and near-idempotent per head."""
    keep4 = None if keep is None else keep[:, None, :, None]
    ranged = states if keep4 is None else states.masked_fill(keep4, 0.0)
    dims = (2, 3) if spec.granularity == "head" else (3,)
    out = fake_quant_range(
        states, ranged.amin(dim=dims, keepdim=True), ranged.amax(dim=dims, keepdim=True), spec.bits, spec.symmetric
    )
    return out if keep4 is None else torch.where(keep4, states, out)


def _kv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    config = getattr(module, "_sinkquant_kv", None)
    if config is not None:
        spec, state = config
        keep = state.kv_mask
        if keep is not None:
            keep = keep[:, -key.shape[2] :]  # a sliding-window cache may hold only the latest positions
        key = fake_quant_kv(key, spec, keep)
        value = fake_quant_kv(value, spec, keep)
    return ALL_ATTENTION_FUNCTIONS[BASE_ATTENTION](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _kv_attention)
# Without a registered mask builder transformers passes no mask at all, which is wrong once a cache offsets
# the queries from the keys; reuse the base implementation's masks.
AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS[BASE_ATTENTION])


def enable_kv_quant(model: nn.Module, adapter: Adapter, spec: KVSpec, state: KeepState) -> None:
    """Tag every attention module with the spec and switch the model to the quantizing attention."""
    for attention in adapter.attention_modules(model):
        attention._sinkquant_kv = (spec, state)
    model.set_attn_implementation(ATTENTION_NAME)
