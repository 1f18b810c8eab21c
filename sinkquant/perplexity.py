"""Perplexity by the GPTQ / SmoothQuant / PrefixQuant protocol, with word perplexity and bits per byte
as lm-eval-harness defines them, and room for a prefix whose KV cache was computed elsewhere."""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from sinkquant.data import TokenStream, WindowPlan
from sinkquant.errors import SinkquantError
from sinkquant.io import library_versions
from sinkquant.memory import release_freed_memory
from sinkquant.models import LoadedModel, model_device

BosPolicy = Literal["never", "per-window", "auto"]
BOS_POLICIES: tuple[str, ...] = ("never", "per-window", "auto")
# Cache layers whose `update` concatenates into new tensors: a copy of the cache may share their tensors.
_REBINDING_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


@dataclass
class Prefix:
    """Tokens that stand before every window. With `cache`, their KV was computed once (e.g. by the
    full-precision model) and is reused, so the evaluated model never processes them itself."""

    ids: list[int]
    cache: DynamicCache | None = None

    def cache_for_batch(self, batch: int) -> DynamicCache | None:
        """A cache of its own for one forward. Dynamic layers replace their tensors on update (never write into
        them), so those tensors are shared rather than copied: the sequential pipeline asks for a fresh cache per
        layer and window (240 on SmolLM2), and copying every layer's KV each time cost ~1 s of a quantize."""
        if self.cache is None:
            return None
        shared = {id(t): t for layer in self.cache.layers if type(layer) in _REBINDING_LAYERS
                  for t in (layer.keys, layer.values) if t is not None}
        cache = copy.deepcopy(self.cache, memo=shared)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


@torch.no_grad()
def build_prefix(model: torch.nn.Module, ids: list[int]) -> Prefix:
    """Run `model` once over `ids` and keep the resulting KV cache."""
    if not ids:
        return Prefix(ids=[], cache=None)
    device = model_device(model)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True)
    return Prefix(ids=list(ids), cache=cache)


@torch.no_grad()
def next_token_nll(model: torch.nn.Module, input_ids: torch.Tensor, start: int, chunk: int = 128
                   ) -> tuple[float, int]:
    """(sum of NLL in nats, token count) of every row's tokens start+1.., each predicted from all before it.
    lm_head runs on `chunk` tokens at a time, its input, captured by a pre-hook that lets the model's own
    head see no position: one window's full logits (100 MB at 512 SmolLM2 tokens, again for the softmax)
    never exist, which keeps a quantization's peak memory near the weights (and a head left on disk is not
    read for nothing)."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        captured.append(args[0])
        return (args[0][:, :0],)

    handle = head.register_forward_pre_hook(hook, prepend=True)  # before a hook that casts to a bf16 head's dtype
    release_freed_memory()
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    hidden, targets = captured[0][:, start:-1].flatten(0, 1), input_ids[:, start + 1 :].flatten()
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2's, applied by its CausalLM head
    if head.weight.dtype != hidden.dtype or getattr(head, "disk_rows", None) is not None:
        return _widened_head_nll(head, hidden, targets, cap), targets.numel()
    total = 0.0
    for part, target in zip(hidden.split(chunk), targets.split(chunk), strict=True):
        logits = head(part).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        total += float(F.cross_entropy(logits, target, reduction="sum"))
    return total, targets.numel()


def _widened_head_nll(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor, cap: float | None,
                      rows: int = 8192) -> float:
    """Summed NLL of `target` under the logits of `hidden` (every scored token) through a head stored in a
    narrower dtype than the layers compute in (a streamed bf16 checkpoint's lm_head), or left on disk (its
    `disk_rows`, quant/stream.py): `rows` vocab rows at a time, each widened once to the layers' dtype, the
    log-partition accumulated across them. On a CPU without bf16 units a bf16 matmul is ~4x slower than fp32, and
    a whole fp32 copy of a 128k-vocab head would be 1-2 GB; the logits alive at once are tokens x `rows` (32 MB
    for 1024 tokens)."""
    bias, disk = getattr(head, "bias", None), getattr(head, "disk_rows", None)
    vocab = disk.shape[0] if disk is not None else head.weight.shape[0]
    log_z = torch.full((hidden.shape[0],), -math.inf, dtype=torch.float32, device=hidden.device)
    picked = torch.zeros_like(log_z)
    for first in range(0, vocab, rows):
        last = min(first + rows, vocab)
        weight = disk.rows(first, last, hidden.dtype) if disk is not None else head.weight[first:last].to(hidden.dtype)
        logits = F.linear(hidden, weight, None if bias is None else bias[first:last].to(hidden.dtype))
        logits = logits.float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        log_z = torch.logaddexp(log_z, torch.logsumexp(logits, dim=-1))
        inside = (target >= first) & (target < last)
        picked[inside] = logits[inside, target[inside] - first]
    return float((log_z - picked).sum())


def logits_after_context(model: torch.nn.Module, ids: torch.Tensor, context: list[int], cached: bool,
                         make_cache: Callable[[int], Cache | None] | None) -> torch.Tensor:
    """Logits [batch, seq, vocab] at every position of `ids` [batch, seq] with `context` in front: as tokens, or,
    when `cached`, only through the KV cache `make_cache(batch)` starts from (a prefix's fp KV). Every scoring
    path (perplexity windows, lm-eval requests) runs its forwards here, so they condition alike."""
    if not cached and context:
        head = torch.tensor(context, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
        inputs = torch.cat([head, ids], dim=1)
    else:
        inputs = ids
    past = make_cache(ids.shape[0]) if make_cache is not None else None
    return model(input_ids=inputs, past_key_values=past, use_cache=past is not None,
                 logits_to_keep=ids.shape[1]).logits


def resolve_bos(policy: str, loaded: LoadedModel) -> bool:
    if policy not in BOS_POLICIES:
        raise SinkquantError(f"unknown BOS policy {policy!r}; valid: {', '.join(BOS_POLICIES)}")
    if policy == "per-window" and loaded.bos_id is None:
        raise SinkquantError(f"model {loaded.spec} has no BOS token; use --bos never (or auto)")
    return policy == "per-window" or (policy == "auto" and loaded.adds_bos)


@dataclass
class PerplexityResult:
    """One evaluation, with everything needed to reproduce or compare it."""

    ppl: float
    word_perplexity: float
    bits_per_byte: float
    nll_sum: float
    tokens: int
    words: int
    bytes: int
    ctx: int
    windows: int
    bos: str
    context_ids: list[int]
    context_cached: bool
    seconds: float
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_words(text: str) -> int:
    """lm-eval-harness's wikitext word count: pieces between whitespace runs."""
    return len(re.split(r"\s+", text))


@torch.no_grad()
def evaluate(
    loaded: LoadedModel,
    stream: TokenStream,
    plan: WindowPlan,
    bos: str = "auto",
    prefix: Prefix | None = None,
    model: torch.nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
    cache: Callable[[int], Cache | None] | None = None,
) -> PerplexityResult:
    """Score tokens 1..ctx-1 of every evaluation window. The context in front (BOS, or a prefix) only
    conditions the model, so every BOS policy and recipe scores exactly the same tokens.

    `model` overrides `loaded.model` (e.g. a quantized copy); tokenizer and provenance come from `loaded`.
    `cache(batch)` makes the KV cache each forward starts from, in place of `prefix.cache_for_batch` (e.g. the
    native backend's int8 KV cache, seeded with the prefix KV itself)."""
    if batch_size < 1:
        raise SinkquantError(f"batch_size={batch_size} is not valid; valid: 1 or more windows per forward pass")
    model = model if model is not None else loaded.model
    add_bos = resolve_bos(bos, loaded)
    if prefix is not None and add_bos and (not prefix.ids or prefix.ids[0] != loaded.bos_id):
        raise SinkquantError("BOS policy asks for BOS but the prefix does not start with it; build the prefix with BOS")
    context = prefix.ids if prefix is not None else ([loaded.bos_id] if add_bos else [])
    ctx = plan.ctx
    limit = loaded.max_context
    if limit is not None and ctx + len(context) > limit:
        raise SinkquantError(
            f"ctx={ctx} plus {len(context)} context token(s) exceeds the model's limit of {limit} positions; "
            f"use --ctx {limit - len(context)} or less"
        )
    device = model_device(model)
    cached = prefix is not None and prefix.cache is not None
    make_cache = cache if cache is not None else (prefix.cache_for_batch if cached else None)
    nll_sum, tokens, words, n_bytes = 0.0, 0, 0, 0
    indices = list(plan.eval_windows)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    start = time.perf_counter()
    for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch" if batch_size > 1 else "window"):
        windows = stream.windows(ctx, batch).to(device)
        logits = logits_after_context(model, windows, context, cached, make_cache)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1), reduction="sum"
        )
        nll_sum += float(nll)
        tokens += windows[:, 1:].numel()
        for row in windows[:, 1:].cpu():
            piece = loaded.tokenizer.decode(row)
            words += _count_words(piece)
            n_bytes += len(piece.encode("utf-8"))
    seconds = time.perf_counter() - start
    if tokens == 0:
        raise SinkquantError("no tokens were scored; check ctx and the number of windows")
    return PerplexityResult(
        ppl=math.exp(nll_sum / tokens),
        word_perplexity=math.exp(nll_sum / words),
        bits_per_byte=nll_sum / (n_bytes * math.log(2)),
        nll_sum=nll_sum,
        tokens=tokens,
        words=words,
        bytes=n_bytes,
        ctx=ctx,
        windows=len(indices),
        bos="prefix" if prefix is not None else ("per-window" if add_bos else "never"),
        context_ids=list(context),
        context_cached=cached,
        seconds=seconds,
        model={"spec": loaded.spec, **loaded.source},
        data={"sha256": stream.text_sha256, **stream.source, **plan.describe()},
    )
