"""Barbero et al. 2025 (Why do LLMs attend to the first token?): the sink is a response to context length, so
measure it as a function of length and depth, with and without BOS. For each length (one sequence, every length a
prefix of the longest, so only the length changes), per layer: the share of heads whose column mean on token 0
exceeds eps (Gu et al.'s sink rate), the mean attention to token 0 over heads, and token 0's residual peak
max_c|h[0,c]| / median|h| (Sun et al.). The sink has formed at a length when token 0 carries a massive activation
in some layer and is the largest residual peak of the sequence there, and the heads give token 0 more attention
than uniform causal attention would (mean over queries of 1/(t+1) = H_T / T; at T = 4 that is already 0.52, which
is why eps = 0.3 alone says nothing about short contexts). In a causal model token 0's own residual state does not
depend on the length; what the length changes is whether the rest of the sequence defers to it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sinkquant.data import TokenStream
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, model_device
from sinkquant.profiling import metrics
from sinkquant.profiling.collectors import _tensor_output, _tokens, attention_probe

CONTEXT_LENGTHS = (2, 4, 16, 64, 256, 1024, 2048)  # the short ones cost nothing and show where the sink starts


def uniform_share(length: int) -> float:
    """alpha_0 under uniform causal attention: query t spreads 1/(t+1) on each key, so mean_t 1/(t+1) = H_T / T."""
    return sum(1.0 / (t + 1) for t in range(length)) / length


class _Depth:
    """Per layer, for one sequence: alpha_0 per head (attention probe) and token 0's residual peak (hook)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.layer_of = {id(m): i for i, m in enumerate(loaded.adapter.attention_modules(loaded.model))}
        n = len(self.layer_of)
        self.alpha0: list[torch.Tensor | None] = [None] * n
        self.peak: list[float] = [0.0] * n
        self.massive0: list[bool] = [False] * n
        self.top_is_0: list[bool] = [False] * n

    def observe(self, module: nn.Module, weights: torch.Tensor, value: torch.Tensor) -> None:
        layer = self.layer_of.get(id(module))
        if layer is not None:
            self.alpha0[layer] = weights.detach()[0, :, :, 0].float().mean(dim=-1)  # every query sees token 0

    def hook(self, index: int) -> Any:
        def residual(module: nn.Module, args: Any, output: Any) -> None:
            h_abs = _tokens(_tensor_output(output)).abs()
            median = h_abs.median()
            token_max = h_abs.amax(dim=-1)
            self.peak[index] = float(token_max[0] / median.clamp_min(torch.finfo(median.dtype).tiny))
            self.massive0[index] = bool(metrics.massive_mask(token_max[0], median))
            self.top_is_0[index] = int(token_max.argmax()) == 0

        return residual


@torch.no_grad()
def _measure(loaded: LoadedModel, ids: list[int]) -> dict[str, Any]:
    depth = _Depth(loaded)
    layers = loaded.adapter.decoder_layers(loaded.model)
    handles = [layer.register_forward_hook(depth.hook(i)) for i, layer in enumerate(layers)]
    try:
        with attention_probe(loaded.model, depth):
            device = model_device(loaded.model)
            loaded.model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    alpha0 = torch.stack(depth.alpha0)  # (layers, heads)
    eps = metrics.SINK_EPS[0]
    peak_formed = any(m and top for m, top in zip(depth.massive0, depth.top_is_0, strict=True))
    chance = uniform_share(len(ids))
    mean_alpha0 = float(alpha0.mean())
    return {
        "tokens": len(ids), "sink_rate": metrics.sink_rate(alpha0, eps),
        "mean_first_token_attention": mean_alpha0, "uniform_share": chance,
        "sink_rate_per_layer": [metrics.sink_rate(row, eps) for row in alpha0],
        "first_token_attention": alpha0.mean(dim=-1).tolist(), "residual_peak": depth.peak,
        "token0_massive_layers": [i for i, m in enumerate(depth.massive0) if m],
        "formed": peak_formed and mean_alpha0 > chance,
    }


def _forms_at(rows: list[dict[str, Any]]) -> int | None:
    """The smallest length from which the sink is formed at every longer length measured."""
    forms = None
    for row in reversed(rows):
        if not row["formed"]:
            break
        forms = row["length"]
    return forms


def context_sweep(loaded: LoadedModel, stream: TokenStream, lengths: tuple[int, ...] = CONTEXT_LENGTHS,
                  progress: bool = False) -> dict[str, Any]:
    """Measure one sequence cut at each length, without BOS and (where the model has one) with BOS in front of
    one fewer text token. Lengths beyond the model's positions or the text are left out and listed."""
    if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
        raise SinkquantError(f"context_lengths={lengths!r} is not valid; valid: integers >= 2")
    limit = min(loaded.max_context or stream.ids.numel(), stream.ids.numel())
    kept = sorted({n for n in lengths if n <= limit})
    skipped = sorted({n for n in lengths if n > limit})
    if not kept:
        raise SinkquantError(f"context_lengths={list(lengths)} all exceed the {limit} tokens the model and text "
                             f"allow; use lengths <= {limit}")
    longest = max(kept)
    start = stream.ids.numel() - longest  # the end of the text, as the profile's calibration windows
    text = stream.ids[start:].tolist()
    modes = {"no_bos": None} if loaded.bos_id is None else {"no_bos": None, "bos": loaded.bos_id}
    result: dict[str, Any] = {"lengths": kept, "skipped_lengths": skipped, "start_token": start,
                              "eps": metrics.SINK_EPS[0]}
    jobs = [(mode, n) for mode in modes for n in kept]
    rows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for mode, n in tqdm(jobs, desc="context sweep", disable=not progress):
        bos = modes[mode]
        ids = text[:n] if bos is None else [bos, *text[: n - 1]]
        rows[mode].append({"length": n, **_measure(loaded, ids)})
    for mode, measured in rows.items():
        result[mode] = {"rows": measured, "forms_at": _forms_at(measured)}
    return result
