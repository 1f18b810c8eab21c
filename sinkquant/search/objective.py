"""What the search minimises: the mean KL divergence, per scored token, of the quantized model's next-token
distribution from the fp32 model's (BOS policy `auto`, no prefix: the model as users run it) on held-out
calibration windows. It is zero only when quantization changes nothing the model predicts, it counts a prefix that
hurts the fp model as well as quantization error, and, unlike the NLL of the text, no change can lower it by
fitting these windows better than fp32 does. A candidate counts as better only beyond the objective's noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sinkquant.models import LoadedModel, model_device
from sinkquant.perplexity import Prefix

OBJECTIVE = "mean KL(fp32 || quantized) of the next-token distribution, nats per scored token"

# A candidate replaces the best so far only if it lowers the objective by more than NOISE_Z standard errors of the
# paired per-token difference (`improvement_z`), in runs of NOISE_BLOCK tokens: keeping every lowering chose on
# noise (docs/auto-search.md).
NOISE_Z = 2.0
NOISE_BLOCK = 32


@torch.no_grad()
def forward(model: torch.nn.Module, window: torch.Tensor, context: list[int], prefix: Prefix | None,
            logits_to_keep: int) -> torch.Tensor:
    """One window [ctx] as perplexity sees it: behind the prefix's KV cache, or behind the BOS context."""
    device = model_device(model)
    if prefix is not None and prefix.cache is not None:
        inputs, past = window[None].to(device), prefix.cache_for_batch(1)
    else:
        inputs, past = torch.cat([torch.tensor(context, dtype=window.dtype), window])[None].to(device), None
    return model(input_ids=inputs, past_key_values=past, use_cache=past is not None,
                 logits_to_keep=logits_to_keep).logits


def _log_probs(model: torch.nn.Module, window: torch.Tensor, context: list[int], prefix: Prefix | None
               ) -> torch.Tensor:
    """log p(token t+1 | ..t) for t = 0..ctx-2 of one window [ctx]: what perplexity scores, as [ctx-1, vocab]."""
    logits = forward(model, window, context, prefix, logits_to_keep=window.numel())
    return F.log_softmax(logits[0, :-1].float(), dim=-1)


class Objective:
    """The fp32 reference is computed once; each candidate costs one quantized forward per scoring window."""

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor) -> None:
        self.windows = windows
        self.context = [loaded.bos_id] if loaded.adds_bos else []
        # KL(p || q) = sum p log p - sum p log q: p and its first term once, one product per candidate.
        self.reference = []
        for window in windows:
            ref = _log_probs(loaded.model, window, self.context, None)
            probs = ref.exp()
            self.reference.append((probs, torch.sum(probs * ref, dim=-1, dtype=torch.float64)))

    def measure(self, model: torch.nn.Module, prefix: Prefix | None) -> tuple[dict[str, float], torch.Tensor]:
        """The score and the KL of every scored token, which the search's paired comparison needs."""
        per_token, nll = [], 0.0
        for window, (probs, neg_entropy) in zip(self.windows, self.reference, strict=True):
            logp = _log_probs(model, window, self.context, prefix)
            per_token.append(neg_entropy - torch.sum(probs * logp, dim=-1, dtype=torch.float64))
            nll -= float(logp.gather(1, window[1:, None].to(logp.device)).sum())
        kl = torch.cat(per_token).cpu()
        return {"objective": float(kl.mean()), "nll": nll / kl.numel()}, kl

    def __call__(self, model: torch.nn.Module, prefix: Prefix | None) -> dict[str, float]:
        return self.measure(model, prefix)[0]


def improvement_z(candidate: torch.Tensor, best: torch.Tensor, block: int = NOISE_BLOCK) -> float:
    """How many standard errors the candidate's mean per-token KL lies below the best's, paired on the same
    tokens. Neighbouring tokens' KLs move together, so the error comes from the means of runs of `block` tokens
    (shorter runs where the tokens make fewer than two)."""
    diff = (best - candidate).double()
    block = max(1, min(block, diff.numel() // 2))
    runs = diff.numel() // block
    error = float(diff[: runs * block].reshape(runs, block).mean(dim=1).std()) / math.sqrt(runs)
    return float(diff.mean()) / max(error, 1e-300)
