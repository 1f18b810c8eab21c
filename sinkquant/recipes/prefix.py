"""Prefix tokens (PrefixQuant / CushionCache): a fixed context whose KV is computed once in full precision,
so the quantized layers never see the sink tokens' peaks and static per-tensor scales fit ordinary tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel

# Candidates for the greedy search: delimiters and weak-semantic words (An et al. 2025 find systematic
# outliers on exactly these).
GREEDY_CANDIDATES = ("\n", "\n\n", ".", ",", " the", " of", " and", ":", ";", "-", " ", "<|endoftext|>")


def token_id(loaded: LoadedModel, token: int | str, field: str) -> int:
    """A recipe may name prefix tokens by id or by text; text must be exactly one token."""
    vocab = loaded.model.config.vocab_size
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise SinkquantError(f"{field}: token id {token} is outside the vocabulary [0, {vocab})")
        return token
    ids = loaded.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise SinkquantError(f"{field}: {token!r} is {len(ids)} tokens {ids}; a prefix entry must be one token")
    return ids[0]


def with_bos(loaded: LoadedModel, ids: Sequence[int], mode: str) -> list[int]:
    """BOS first where the model has one ('auto'), never duplicated; 'always' demands a BOS."""
    bos = loaded.bos_id
    if mode == "always" and bos is None:
        raise SinkquantError(f"prefix.bos='always' but model {loaded.spec} has no BOS token; use 'auto' or 'never'")
    body = [i for i in ids if i != bos]
    return ([bos] if bos is not None and mode != "never" else []) + body


@torch.no_grad()
def max_linear_input(loaded: LoadedModel, model: torch.nn.Module, prefix: list[int], sample: torch.Tensor) -> float:
    """Largest |x| at any decoder Linear input over the tokens after the prefix: what a static scale must cover."""
    peak = torch.zeros(())
    start = len(prefix)

    def hook(_module, args):
        nonlocal peak
        # Some architectures (OPT's MLP) flatten (batch, tokens) before the Linear: restore the token axis.
        x = args[0].reshape(sample.shape[0], -1, args[0].shape[-1])
        peak = torch.maximum(peak, x[:, start:].abs().amax())

    handles = [m.register_forward_pre_hook(hook) for m in loaded.adapter.linear_layers(model).values()]
    try:
        head = torch.tensor([prefix] * sample.shape[0], dtype=sample.dtype).reshape(sample.shape[0], -1)
        model(input_ids=torch.cat([head, sample], dim=1), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return float(peak)


def greedy_prefix(
    loaded: LoadedModel,
    sample: torch.Tensor,
    max_tokens: int,
    bos_mode: str,
    min_gain: float = 0.05,
) -> tuple[list[int], list[dict]]:
    """CushionCache-style: add the candidate token that most lowers the largest activation of the following
    tokens; stop when no candidate lowers it by `min_gain` (relative) or at `max_tokens`."""
    start = time.perf_counter()
    candidates: list[int] = []
    for text in GREEDY_CANDIDATES:
        ids = loaded.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in candidates:
            candidates.append(ids[0])
    prefix = with_bos(loaded, [], bos_mode)
    best = max_linear_input(loaded, loaded.model, prefix, sample)
    trace = [{"prefix": list(prefix), "max_linear_input": best}]
    while len(prefix) < max_tokens:
        scores = {c: max_linear_input(loaded, loaded.model, prefix + [c], sample)
                  for c in candidates if c not in prefix}
        if not scores:
            break
        choice = min(scores, key=lambda c: (scores[c], c))
        if scores[choice] > best * (1 - min_gain):
            break
        prefix.append(choice)
        best = scores[choice]
        trace.append({"prefix": list(prefix), "max_linear_input": best, "seconds": time.perf_counter() - start})
    return prefix, trace
