"""Simulated KV-cache quantization: key/value states (post-RoPE, the whole cache including past tokens) are
fake-quantized right before attention, except kept positions, as a transform of sinkquant's attention."""

from __future__ import annotations

import torch
from torch import nn

from sinkquant.adapters import Adapter
from sinkquant.quant.attention import add_transform
from sinkquant.quant.keep import KeepState
from sinkquant.quant.primitives import fake_quant_range
from sinkquant.quant.scheme import KVScheme


def fake_quant_kv(states: torch.Tensor, spec: KVScheme, keep: torch.Tensor | None) -> torch.Tensor:
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


def enable_kv_quant(model: nn.Module, adapter: Adapter, spec: KVScheme, state: KeepState) -> None:
    """Quantize every attention module's keys and values as they enter attention."""

    def transform(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        keep = state.kv_mask
        if keep is not None:
            keep = keep[:, -key.shape[2] :]  # a sliding-window cache may hold only the latest positions
        return query, fake_quant_kv(key, spec, keep), fake_quant_kv(value, spec, keep)

    add_transform(model, adapter, lambda index, attention: transform)
