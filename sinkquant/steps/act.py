"""Attention calibration (ACT, Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks"): besides the
first token, some heads pour attention onto ordinary tokens (hidden sinks: column mean a_k > 0.1). In heads chosen
on calibration data, ACT scales the attention on those tokens by beta (0.4 in the paper) and gives the mass back to
the other tokens in proportion to their own attention. No weight changes: the step installs an attention function.

At inference a key counts as a hidden sink for query t when its running column mean over queries k..t exceeds the
threshold after at least `min_queries` queries: the same statistic as ACT's, but causal (a query never looks at
later queries' attention), so perplexity stays a valid next-token measure. The first token (absolute position 0)
and keys held only in a cache (a prefix's fp KV) are never scaled.

The calibrated attention is a core of sinkquant's one composing attention function (quant/attention.py
`set_core`): the per-module state lives on the attention module (`_sinkquant_act`), modules without a chosen head
keep the base core, and every (query, key, value) transform installed by other steps (KV quantization, rotation)
runs before it, so ACT sees the keys and values the quantized model really attends with."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sinkquant.adapters import Adapter
from sinkquant.errors import SinkquantError
from sinkquant.profiling import metrics
from sinkquant.profiling.collectors import attention_probe, eager_attention
from sinkquant.quant.attention import set_core
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import ActConfig, ActSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

__all__ = ["ActConfig", "ActState", "ActStep", "act_attention", "additive_mask", "calibrate", "install"]


@dataclass(frozen=True)
class ActState:
    """What one attention module calibrates."""

    heads: tuple[int, ...]
    beta: float
    threshold: float
    min_queries: int


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The eager functions add the mask to the scores; the composing function builds SDPA's masks (boolean, or
    None for plain causal attention), so convert them. Queries are the last positions of the keys."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    tq, tk = query.shape[-2], key.shape[-2]
    if mask is None:
        mask = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


def calibrate(output: torch.Tensor, weights: torch.Tensor, value: torch.Tensor, state: ActState) -> torch.Tensor:
    """ACT on the chosen heads of one eager attention call. output (B, Tq, H, D), weights (B, H, Tq, Tk), value
    (B, KV, Tk, D). With S_t the mass row t puts on its sink keys and c_t = (1 - beta S_t) / (1 - S_t), the
    calibrated row is beta A on sinks and c_t A elsewhere, so out' = c_t out + (beta - c_t) (A * sinks) V."""
    heads = torch.tensor(state.heads, device=output.device)
    attn = weights[:, heads].float()  # (B, h, Tq, Tk)
    b, _, tq, tk = attn.shape
    past = tk - tq
    query_pos = past + torch.arange(tq, device=attn.device)[:, None]
    key_pos = torch.arange(tk, device=attn.device)[None, :]
    seen = (query_pos - key_pos + 1).clamp_min(0)  # queries of this call that have seen each key so far
    running = attn.cumsum(dim=-2) / seen.clamp_min(1)
    sinks = (running > state.threshold) & (seen >= state.min_queries) & (key_pos >= max(past, 1))
    sink_attn = attn * sinks
    mass = sink_attn.sum(dim=-1, keepdim=True)
    c = (1 - state.beta * mass) / (1 - mass).clamp_min(torch.finfo(attn.dtype).eps)
    groups = weights.shape[1] // value.shape[1]
    sink_out = sink_attn @ value[:, heads // groups].float()  # (B, h, Tq, D)
    chosen = output[:, :, heads].transpose(1, 2).float()
    calibrated = c * chosen + (state.beta - c) * sink_out
    output = output.clone()
    output[:, :, heads] = calibrated.transpose(1, 2).to(output.dtype)
    return output


def act_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Core attention of a module with chosen heads: the architecture's eager attention, then ACT."""
    state: ActState = module._sinkquant_act
    eager = eager_attention(module)
    output, weights = eager(module, query, key, value, additive_mask(attention_mask, query, key), **kwargs)
    return calibrate(output, weights, value, state), None


class _HiddenSinks:
    """Calibration observer: per (layer, head), in how many windows it has a hidden sink beyond token 0 (column
    mean > threshold over keys seen by at least min_queries queries); and which positions / ids those sinks are."""

    def __init__(self, layer_of: dict[int, int], heads: int, threshold: float, min_queries: int) -> None:
        self.layer_of = layer_of
        self.threshold = threshold
        self.min_queries = min_queries
        self.windows = torch.zeros(len(layer_of), heads, dtype=torch.long)
        self.current: set[int] = set()  # window positions that are a hidden sink in some head of some layer

    def observe(self, module: nn.Module, weights: torch.Tensor, value: torch.Tensor) -> None:
        layer = self.layer_of.get(id(module))
        if layer is None:
            return
        attn = weights.detach()[0].float()  # (H, Tq, Tk)
        tq, tk = attn.shape[-2:]
        past = tk - tq
        cols = metrics.column_mean(attn[:, :, past:])  # keys of this window, seen by queries of this window
        last = tq - min(self.min_queries, tq // 2)
        first = 0 if past else 1
        hit = cols[:, first : last + 1] > self.threshold
        self.windows[layer] += hit.any(dim=-1).long()
        self.current.update((torch.nonzero(hit.any(dim=0)).flatten() + first).tolist())


def install(model: nn.Module, adapter: Adapter, heads: list[list[int]], config: ActConfig) -> None:
    """Put each module's ACT state on it and make ACT the core attention of the modules with chosen heads; a
    module chosen before and not now goes back to the base core."""
    attention = adapter.attention_modules(model)
    for module, chosen in zip(attention, heads, strict=True):
        if chosen:
            module._sinkquant_act = ActState(tuple(chosen), config.beta, config.threshold, config.min_queries)
        elif getattr(module, "_sinkquant_core", None) is act_attention:
            del module._sinkquant_core, module._sinkquant_act
    set_core(model, adapter, lambda index, module: act_attention if heads[index] else None)


@register
class ActStep(ActSpec, Step):
    """Recipe step `act`: attention calibration of hidden sinks in heads chosen on the calibration windows."""

    @torch.no_grad()
    def apply(self, session: Session) -> dict[str, Any]:
        config: ActConfig = self.config
        model = session.model
        attention = session.loaded.adapter.attention_modules(model)
        layer_of = {id(m): i for i, m in enumerate(attention)}
        observer = _HiddenSinks(layer_of, model.config.num_attention_heads, config.threshold, config.min_queries)
        if not len(session.calibration):
            raise SinkquantError("act needs calibration windows; give the recipe at least one (calib_windows >= 1)")
        positions: Counter[int] = Counter()
        ids: Counter[int] = Counter()
        with attention_probe(model, observer):
            for batch in session.batches():
                model(**batch)
                row = batch["input_ids"][0].tolist()
                positions.update(observer.current)
                ids.update(row[p] for p in observer.current)
                observer.current.clear()
        needed = config.head_share * len(session.calibration)
        chosen = [[h for h in range(observer.windows.shape[1]) if observer.windows[layer, h] >= needed]
                  for layer in range(len(attention))]
        install(model, session.loaded.adapter, chosen, config)
        decode = session.loaded.tokenizer.decode
        return {
            "heads": [[layer, h] for layer, hs in enumerate(chosen) for h in hs],
            "calibration_windows": len(session.calibration),
            "sink_positions": [{"position": p, "windows": k} for p, k in sorted(
                positions.items(), key=lambda e: (-e[1], e[0]))[:20]],
            "sink_token_ids": [{"id": i, "token": decode([i]), "count": k} for i, k in sorted(
                ids.items(), key=lambda e: (-e[1], e[0]))[:20]],
            **config.model_dump(mode="json"),
        }

    def restore(self, session: Session, record: dict[str, Any]) -> None:
        attention = session.loaded.adapter.attention_modules(session.model)
        heads: list[list[int]] = [[] for _ in attention]
        for layer, head in record["heads"]:
            if not 0 <= layer < len(attention):
                raise SinkquantError(f"act record names layer {layer}; the model has {len(attention)} layers")
            heads[layer].append(head)
        install(session.model, session.loaded.adapter, heads, self.config)
