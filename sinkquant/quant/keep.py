"""Which positions stay in full precision, resolved once per forward pass and shared by every quantizer.

A forward pre-hook on the top-level model reads input_ids (and, when a KV cache or cache_position is
passed, the offset of the current tokens) and fills a `KeepState`; QuantLinear layers and the KV-cache
attention function then read the same boolean masks instead of each recomputing them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sinkquant.errors import SinkquantError
from sinkquant.quant.scheme import KeepPolicy


class KeepState:
    """Masks for the forward pass in flight: `mask` [batch, seq] over the current tokens and `kv_mask`
    [batch, past + seq] over every absolute position the attention sees. Past tokens held only in a cache
    are judged by position (their ids were never seen here)."""

    def __init__(self, policy: KeepPolicy) -> None:
        self.policy = policy
        self.mask: torch.Tensor | None = None
        self.kv_mask: torch.Tensor | None = None
        self.tokens_kept = 0

    def resolve(self, input_ids: torch.Tensor | None, shape: tuple[int, int], start: int, device: torch.device) -> None:
        if not self.policy:
            self.mask = self.kv_mask = None
            return
        batch, seq = shape
        absolute = torch.arange(start + seq, device=device)
        by_position = torch.isin(absolute, torch.tensor(self.policy.positions, dtype=torch.long, device=device))
        kv_mask = by_position.expand(batch, -1).clone()
        if self.policy.token_ids and input_ids is not None:
            ids = torch.tensor(self.policy.token_ids, dtype=input_ids.dtype, device=device)
            kv_mask[:, start:] |= torch.isin(input_ids, ids)
        self.kv_mask = kv_mask
        self.mask = kv_mask[:, start:]
        self.tokens_kept += int(self.mask.sum())

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
            "call the model through its top-level forward with [batch, seq] inputs"
        )

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """forward_pre_hook(with_kwargs=True) for the CausalLM."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise SinkquantError("position-aware quantization needs input_ids or inputs_embeds")
        shape = (reference.shape[0], reference.shape[1])
        cache_position = kwargs.get("cache_position")
        past = kwargs.get("past_key_values")
        if cache_position is not None:
            start = int(cache_position[0])
        elif past is not None:
            start = int(past.get_seq_length())
        else:
            start = 0
        self.resolve(input_ids, shape, start, reference.device)


def attach_keep_state(model: nn.Module, policy: KeepPolicy) -> KeepState:
    """Install the pre-hook once; the state is an attribute of the model so deepcopy keeps it consistent."""
    state = KeepState(policy)
    model._sinkquant_keep = state
    model.register_forward_pre_hook(state.hook, with_kwargs=True)
    return state
