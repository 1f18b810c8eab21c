"""Prefix tokens (PrefixQuant / CushionCache): a fixed context whose KV is computed once in full precision,
so the quantized layers never see the sink tokens' peaks and static per-tensor scales fit ordinary tokens.

A prefix must not hurt the full-precision model, or quantization starts from a worse model. Two rules:

- BOS only where the model is trained with one (`bos_evidence`): its tokenizer adds BOS to a text, its GGUF
  metadata says `tokenizer.ggml.add_bos_token`, or its chat template starts every conversation with it. A
  tokenizer merely *naming* a BOS id is not evidence (Qwen2.5 names `<|endoftext|>` and never adds it).
- Every automatically chosen token is checked against the fp model's calibration loss: the mean next-token
  NLL of the same calibration tokens with and without the prefix. A candidate is kept only while the prefix
  raises that loss by at most `MAX_NLL_INCREASE` nats (1% perplexity); the check is recorded either way.
  Tokens a recipe lists explicitly are honoured (or refused with a reason), and checked and recorded too."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from sinkquant.data import TokenStream
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, bos_evidence
from sinkquant.perplexity import build_prefix, next_token_nll
from sinkquant.profiling.profiler import profile
from sinkquant.profiling.verdict import Verdict
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import PrefixSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

# Candidates for the greedy search: delimiters and weak-semantic words (An et al. 2025 find systematic
# outliers on exactly these).
GREEDY_CANDIDATES = ("\n", "\n\n", ".", ",", " the", " of", " and", ":", ";", "-", " ", "<|endoftext|>")
# PrefixQuant's own fallbacks when a profile names no outlier token: the most frequent outliers it reports.
FALLBACK_CANDIDATES = ("\n", ".")
GREEDY_SAMPLE_TOKENS = 128
# Prefix selection profiles only a few calibration windows: the PrefixQuant rule is stable on SmolLM2 from 2 on.
PROFILE_WINDOWS = 2
# The fp-loss check: whole calibration windows (a prefix's effect fades along the window, so a shorter sample
# overstates it: on SmolLM2 BOS costs +0.016 nats over 256 tokens and saves 0.027 over 512), and the largest
# loss increase a prefix may cause.
CHECK_WINDOWS = 2
MAX_NLL_INCREASE = math.log(1.01)  # nats per token: +1% fp perplexity on the calibration sample


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
    """BOS first where the model is trained with one ('auto', see `bos_evidence`) or always ('always', which
    demands a BOS id); never duplicated. 'never' adds none, and refuses `ids` that name the BOS themselves
    rather than silently dropping it."""
    bos = loaded.bos_id
    if mode == "always" and bos is None:
        raise SinkquantError(f"prefix.bos='always' but model {loaded.spec} has no BOS token; use 'auto' or 'never'")
    if mode == "never":
        if bos is not None and bos in ids:
            raise SinkquantError(f"prefix.tokens lists {bos} ({loaded.tokenizer.decode([bos])!r}), the BOS id of "
                                 f"{loaded.spec}, but prefix.bos is 'never'; drop it from tokens or set bos: always")
        return list(ids)
    add = bos is not None and (mode == "always" or bos_evidence(loaded)["trained"])
    return ([bos] if add and bos not in ids else []) + list(ids)


@torch.no_grad()
def calibration_nll(loaded: LoadedModel, prefix: list[int], sample: torch.Tensor) -> float:
    """Mean next-token NLL (nats) of the fp model on `sample`'s tokens 1..T-1, with `prefix` in front: the
    same targets whatever the prefix, so two prefixes compare directly."""
    head = torch.tensor(prefix, dtype=sample.dtype, device=sample.device).expand(sample.shape[0], -1)
    total, count = next_token_nll(loaded.model, torch.cat([head, sample], dim=1), start=len(prefix))
    return total / count


def check_prefix(loaded: LoadedModel, head: list[int], candidates: Sequence[int] | Callable[[], Sequence[int]],
                 sample: torch.Tensor, max_tokens: int, keep_all: bool = False) -> tuple[list[int], dict[str, Any]]:
    """Grow `head` by each candidate in turn, keeping one only while the whole prefix raises the fp
    calibration NLL by at most MAX_NLL_INCREASE over no prefix at all (`keep_all`: record, keep anyway).
    `candidates` may be a function, called only if `head` leaves room: a profile costs as much as the check."""
    baseline = calibration_nll(loaded, [], sample)
    limit = baseline + MAX_NLL_INCREASE
    prefix: list[int] = []
    rows = []

    def tokens() -> Iterator[int]:
        yield from head
        if len(prefix) < max_tokens:
            yield from candidates() if callable(candidates) else candidates

    for token in tokens():
        if len(prefix) >= max_tokens:
            break
        nll = calibration_nll(loaded, prefix + [token], sample)
        kept = keep_all or nll <= limit
        rows.append({"id": token, "token": loaded.tokenizer.decode([token]), "nll": nll,
                     "delta_nll": nll - baseline, "kept": kept})
        if kept:
            prefix.append(token)
    return prefix, {"metric": "mean next-token NLL (nats) of the fp model, same targets with and without prefix",
                    "sample": list(sample.shape), "baseline_nll": baseline, "max_increase": MAX_NLL_INCREASE,
                    "candidates": rows}


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


def calibration_profile(loaded: LoadedModel, windows: torch.Tensor) -> dict[str, Any]:
    """A profile of the first PROFILE_WINDOWS calibration windows (no probe): what the prefix step reads when
    the caller has no profile; compute it once to share it between several recipes."""
    sample = windows[:PROFILE_WINDOWS]
    stream = TokenStream(ids=sample.reshape(-1), text_sha256="calibration windows", source={"kind": "calibration"})
    return profile(loaded, stream, ctx=sample.shape[1], windows=sample.shape[0], bos="never", progress=False,
                   probe=False)


def profile_candidates(loaded: LoadedModel, windows: torch.Tensor, profile_report: dict | None) -> tuple[
        list[int], dict[str, Any]]:
    """PrefixQuant's content tokens: the profile's most frequent outlier ids outside position 0, at least one
    (the positional sink needs a home even where the profile counts no outlier token), BOS excluded."""
    verdict = Verdict.of(profile_report or calibration_profile(loaded, windows))
    o = max(int(verdict.outlier_token_count), 1)
    ranked = verdict.prefix_candidates or [{"id": i} for i in verdict.prefix_ids]
    ids = [c["id"] for c in ranked if c["id"] != loaded.bos_id]
    if not ids:
        encoded = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in FALLBACK_CANDIDATES]
        ids = [e[0] for e in encoded if len(e) == 1]
    return ids[:o], {"verdict_prefix": verdict.prefix_ids, "outlier_token_count": verdict.outlier_token_count}


def select_prefix_ids(
    loaded: LoadedModel,
    calibration_windows: torch.Tensor,
    max_tokens: int,
    bos_mode: str = "auto",
    tokens: str | Sequence[int | str] = "profile",
    profile_report: dict | None = None,
    check: bool = True,
) -> tuple[list[int], dict[str, Any]]:
    """The prefix step's choice: `tokens` is 'profile' (PrefixQuant: BOS where trained with one, then the
    profile's most frequent outlier tokens), 'greedy' (CushionCache) or an explicit list (ids or one-token
    strings), honoured as given or refused with a reason. Automatic choices pass the fp calibration-loss check
    (`check_prefix`); an explicit list is checked and recorded unless `check` is False (`--recipe auto` measures
    each prefix's effect itself); the record says where the ids came from, the BOS evidence and every check."""
    start = time.perf_counter()
    sample = calibration_windows[:CHECK_WINDOWS]
    record: dict[str, Any] = {"bos": {"mode": bos_mode, **bos_evidence(loaded)}}
    if not isinstance(tokens, str):
        ids = [token_id(loaded, t, f"prefix.tokens[{i}]") for i, t in enumerate(tokens)]
        ids = with_bos(loaded, ids, bos_mode)
        if len(ids) > max_tokens:
            raise SinkquantError(f"prefix.tokens gives {len(ids)} tokens {ids} (BOS included) but prefix.max_tokens "
                                 f"is {max_tokens}; list fewer tokens or raise max_tokens")
        if check:
            ids, record["check"] = check_prefix(loaded, [], ids, sample, max_tokens, keep_all=True)
        record["source"] = "recipe"
    else:
        head = with_bos(loaded, [], bos_mode)
        if tokens == "greedy":
            found, record["trace"] = greedy_prefix(loaded, calibration_windows[:2, :GREEDY_SAMPLE_TOKENS],
                                                   max_tokens, bos_mode)
            candidates = found[len(head):]
        elif tokens == "profile":
            def candidates() -> list[int]:  # only if BOS leaves room in the prefix or fails its check
                found, record["profile"] = profile_candidates(loaded, calibration_windows, profile_report)
                return found
        else:
            raise SinkquantError(f"prefix.tokens: {tokens!r} is not 'profile', 'greedy' or a list of tokens")
        ids, record["check"] = check_prefix(loaded, head, candidates, sample, max_tokens)
        record["source"] = tokens
    record.update(ids=ids, tokens=[loaded.tokenizer.decode([i]) for i in ids], seconds=time.perf_counter() - start)
    return ids, record


@register
class PrefixStep(PrefixSpec, Step):
    def apply(self, session: Session) -> dict[str, Any]:
        loaded, cfg = session.loaded, self.config
        ids, record = select_prefix_ids(loaded, session.calibration, cfg.max_tokens, cfg.bos, cfg.tokens,
                                        session.profile_report, check=cfg.check)
        session.prefix = build_prefix(loaded.model, ids)
        session.keep = session.keep.merged(positions=tuple(range(len(ids))))
        return {**record, "ids": ids, "tokens": [loaded.tokenizer.decode([i]) for i in ids], "bos_mode": cfg.bos}
