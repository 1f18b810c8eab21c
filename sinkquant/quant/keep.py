"""Which positions stay in full precision, resolved once per decoder layer call from the position ids that every
architecture passes to its layers, so the same masks hold in a whole-model forward, in the layer-by-layer
calibration pipeline and in `generate` (where a KV cache offsets the positions).

Kept token ids (as opposed to positions) need the ids themselves: a pre-hook on the top-level model records
them, and the layer-by-layer pipeline sets them per batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Cache

from sinkquant.adapters import Adapter
from sinkquant.errors import SinkquantError
from sinkquant.quant.scheme import KeepPolicy


def _positions(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Absolute positions [batch, seq] of the tokens a decoder layer is about to process, and the cache length."""
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, seq = hidden.shape[0], hidden.shape[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.expand(batch, -1), int(position_ids[0, 0])
    cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)
    start = cache.get_seq_length() if cache is not None else 0
    return torch.arange(start, start + seq, device=hidden.device).expand(batch, -1), start


class KeepState:
    """Masks for the forward pass in flight: `mask` [batch, seq] over the current tokens and `kv_mask`
    [batch, past + seq] over every absolute position the attention sees. Past tokens held only in a cache are
    judged by position (their ids were never seen here)."""

    def __init__(self, policy: KeepPolicy) -> None:
        self.policy = policy
        self.mask: torch.Tensor | None = None
        self.kv_mask: torch.Tensor | None = None
        self.input_ids: torch.Tensor | None = None

    def resolve(self, positions: torch.Tensor, start: int) -> None:
        """positions: absolute positions [batch, seq] of the current tokens, the first one being `start`."""
        if not self.policy:
            self.mask = self.kv_mask = None
            return
        batch, seq = positions.shape
        device = positions.device
        absolute = torch.arange(start + seq, device=device)
        kept = torch.tensor(self.policy.positions, dtype=torch.long, device=device)
        kv_mask = torch.isin(absolute, kept).expand(batch, -1).clone()
        ids = self.input_ids
        if self.policy.token_ids and ids is not None and ids.shape == positions.shape:
            kv_mask[:, start:] |= torch.isin(ids.to(device), torch.tensor(self.policy.token_ids, device=device))
        self.kv_mask = kv_mask
        self.mask = kv_mask[:, start:]

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The current mask, checked against an activation [batch, seq, hidden]."""
        if self.mask is None:
            return None
        if self.mask.shape == x.shape[:-1]:
            return self.mask
        if self.mask.numel() == x.shape[:-1].numel():  # OPT flattens [batch, seq] into rows before its MLP
            return self.mask.reshape(x.shape[:-1])
        raise SinkquantError(
            f"keep mask {tuple(self.mask.shape)} does not match activation {tuple(x.shape[:-1])}; "
            "quantized layers must be called inside a decoder layer of the model they were built for"
        )

    def layer_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """forward_pre_hook(with_kwargs=True) for each decoder layer."""
        positions, start = _positions(args, kwargs)
        self.resolve(positions, start)

    def model_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """forward_pre_hook(with_kwargs=True) for the CausalLM: remembers the ids for kept token ids."""
        self.input_ids = kwargs.get("input_ids", args[0] if args else None)


_ATTRIBUTE = "_sinkquant_keep"  # where a quantized model carries its KeepState (a deepcopy carries it along)


def keep_state(model: nn.Module) -> KeepState | None:
    """The model's KeepState (`attach_keep_state`); None: sinkquant has not quantized this model."""
    return getattr(model, _ATTRIBUTE, None)


def detach_keep_state(model: nn.Module) -> None:
    """Drop the state from a copy that leaves sinkquant (an export's plain model); its hooks go with the caller's
    clearing of forward pre-hooks."""
    model.__dict__.pop(_ATTRIBUTE, None)


def attach_keep_state(model: nn.Module, adapter: Adapter, policy: KeepPolicy) -> KeepState:
    """Install the hooks once; the state is an attribute of the model so a copy keeps it consistent."""
    state = KeepState(policy)
    setattr(model, _ATTRIBUTE, state)
    if policy:
        model.register_forward_pre_hook(state.model_hook, with_kwargs=True)
        for layer in adapter.decoder_layers(model):
            layer.register_forward_pre_hook(state.layer_hook, with_kwargs=True)
    return state


@contextlib.contextmanager
def keep_hooks(model: nn.Module, adapter: Adapter, state: KeepState) -> Iterator[KeepState]:
    """The hooks of `attach_keep_state` for the duration of a block (statistics gathered before quantization)."""
    handles = [model.register_forward_pre_hook(state.model_hook, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(state.layer_hook, with_kwargs=True)
                for layer in adapter.decoder_layers(model)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
