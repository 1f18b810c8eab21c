"""Pure tensor functions, one per published metric (see /work/shared/docs/metrics.md), so each can be checked on
hand-made tensors and the numbers compare with the papers. Nothing here knows about models or hooks."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import torch

# Where each metric comes from; copied into every report so a reader can check the definitions.
SOURCES: dict[str, str] = {
    "massive_activation": "Sun et al. 2024, Massive Activations in LLMs: |h| > 100 and >= 1000x median",
    "token_outlier_ratio": "Chen et al. 2024, PrefixQuant: r_t = max_c|X[t,c]| / median_t, outlier if r_t > 64",
    "prefix_rule": "Chen et al. 2024, PrefixQuant: o = ceil(mean_seq max_layer #outlier tokens), o most frequent ids",
    "systematic_outlier": "An et al. 2025, Systematic Outliers in LLMs: max_c|h[t,c]| > 1000x mean|h| of the tensor",
    "sink_rate": "Gu et al. 2024, When Attention Sink Emerges: 100 x share of (layer, head) with alpha_k > eps",
    "first_token_attention": "Xiao et al. 2024, StreamingLLM: attention of late queries to token 0 per layer",
    "hidden_sink": "Yu et al. 2024, ACT (Unveiling and Harnessing Hidden Attention Sinks): column mean > 0.1",
    "value_drain_dormant": "Guo et al. 2024, Active-Dormant Attention Heads: value drain ||v_sink|| / median ||v_t||",
    "kurtosis_inf_norm": "Bondarenko et al. 2023, Quantizable Transformers: E[(x-mu)^4]/(sigma^4+1e-6), max|x|; "
                         "per decoder-layer output as the paper defines it (residual.layers), and per Linear input "
                         "(linears), where activation quantization acts",
    "int8_outlier_feature": "Dettmers et al. 2022, LLM.int8(): column j outlier if any |X[t,j]| >= 6.0",
    "quant_error_attribution": "Chen et al. 2024, PrefixQuant fig. 1: share of ||Q(X)-X||^2 held by the top-k tokens",
    "domain_heads": "Guo et al. 2024, Active-Dormant Attention Heads: a head dormant (alpha_0 >= 0.8, row entropy "
                    "<= 1 nat) on one text domain can be active on another",
    "massive_intervention": "Sun et al. 2024, Massive Activations in LLMs, sec. 3.1: set the massive activations "
                            "to zero (perplexity explodes) or to their mean over sequences (unchanged)",
    "context_sweep": "Barbero et al. 2025, Why do LLMs attend to the first token?: the sink as a function of "
                     "context length and depth, with and without BOS",
    "waiver_selection": "Yan et al.: per layer, whether the sink (waiver) element is chosen by position or by "
                        "content (position swap and content planting, sink = massive activation, Sun et al.)",
    "attention_calibration": "Yu et al. 2024, ACT: in chosen heads scale hidden-sink columns (a_k > 0.1, k > 0) by "
                             "beta = 0.4 and give the mass back to the other tokens in proportion",
}

MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
TOKEN_OUTLIER_ETA = 64.0
SYSTEMATIC_RATIO = 1000.0
SINK_EPS = (0.3, 0.8)
INT8_OUTLIER_THRESHOLD = 6.0
KURTOSIS_EPS = 1e-6
DORMANT_ALPHA = 0.8
DORMANT_ENTROPY = 1.0

DELIMITERS = frozenset(".,;:!?\n\t-–—()[]{}\"'`/\\|=@#*<>")
WEAK_SEMANTIC = frozenset(
    ["the", "a", "an", "of", "and", "or", "to", "in", "on", "at", "for", "with", "by", "from", "as", "is", "was",
     "be", "are", "were", "it", "its", "this", "that"]
)


def massive_mask(h_abs: torch.Tensor, median: float | torch.Tensor) -> torch.Tensor:
    """Sun et al.: an entry is massive when it is > 100 and at least 1000x the layer's median |h|."""
    return (h_abs > MASSIVE_ABS) & (h_abs >= MASSIVE_RATIO * median)


def top_entries(h_abs: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k |h| entries of a (T, C) tensor as (values, positions, channels). Exact ties (rare in float
    activations) keep torch.topk's order, which is deterministic for the same input on the same device."""
    flat = h_abs.reshape(-1)
    values, index = torch.topk(flat, min(k, flat.numel()))
    return values, index // h_abs.shape[-1], index % h_abs.shape[-1]


def token_outlier_ratio(token_max: torch.Tensor) -> torch.Tensor:
    """PrefixQuant: r_t = m_t / median_t(m_t), with m_t = max_c |X[t, c]| given as `token_max`."""
    return token_max / token_max.median().clamp_min(torch.finfo(token_max.dtype).tiny)


def outlier_tokens(token_max: torch.Tensor, eta: float = TOKEN_OUTLIER_ETA) -> torch.Tensor:
    """PrefixQuant: token t is an outlier when r_t > eta (64)."""
    return token_outlier_ratio(token_max) > eta


def prefix_length(outlier_counts: Iterable[Iterable[int]]) -> int:
    """PrefixQuant: o = ceil(mean over sequences of the max over layers of the number of outlier tokens)."""
    per_seq = [max(layers) for layers in outlier_counts]
    return math.ceil(sum(per_seq) / len(per_seq)) if per_seq else 0


def prefix_ids(outlier_ids: Counter[int], o: int, bos_id: int | None) -> list[int]:
    """PrefixQuant: BOS (when the model has one) then the o most frequent outlier ids seen outside position 0.
    Ties break on the smaller id so the answer is deterministic."""
    ranked = sorted((i for i in outlier_ids if i != bos_id), key=lambda i: (-outlier_ids[i], i))
    return ([bos_id] if bos_id is not None else []) + ranked[:o]


def systematic_outliers(h_abs: torch.Tensor) -> torch.Tensor:
    """An et al.: positions t with max_c |h[t, c]| > 1000 x mean |h| of the whole (T, C) tensor."""
    return h_abs.amax(dim=-1) > SYSTEMATIC_RATIO * h_abs.mean()


def token_bucket(text: str, position: int) -> str:
    """An et al.'s buckets for a flagged position: initial token, delimiter, weak-semantic word, or other."""
    if position == 0:
        return "initial"
    stripped = text.strip()
    if not stripped or all(ch in DELIMITERS for ch in stripped):
        return "delimiter"
    if stripped.lower() in WEAK_SEMANTIC:
        return "weak_semantic"
    return "other"


def column_mean(attn: torch.Tensor) -> torch.Tensor:
    """alpha_k (Gu et al.) = a_k (ACT) = sum_{t>=k} A[t, k] / (T - k) for causal (..., T, T) probabilities."""
    t = attn.shape[-2]
    counts = torch.arange(t, 0, -1, dtype=attn.dtype, device=attn.device)
    return attn.sum(dim=-2) / counts


def sink_rate(alpha: torch.Tensor, eps: float) -> float:
    """Gu et al.: 100 x the share of (layer, head) pairs whose alpha_k exceeds eps (a share of heads, not mass)."""
    return 100.0 * float((alpha > eps).float().mean())


def row_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each query's attention row; near 0 for a dormant head that looks only at its sink."""
    return -torch.special.xlogy(attn, attn).sum(dim=-1)


def dormant_heads(alpha0: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """Guo et al.'s dormant head: almost all attention on the sink (alpha_0 >= 0.8, Barbero's strict eps) with a
    low mean row entropy (<= 1 nat); inputs and output are (layers, heads)."""
    return (alpha0 >= DORMANT_ALPHA) & (entropy <= DORMANT_ENTROPY)


def value_drain(values: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Guo et al.: ||v_sink|| / median_t ||v_t|| per head of (..., heads, T, D) value states (small = drained)."""
    norms = values.norm(dim=-1)
    return norms[..., sink] / norms.median(dim=-1).values.clamp_min(torch.finfo(norms.dtype).tiny)


def norm_peak(h: torch.Tensor, sink: int = 0) -> float:
    """Guo et al.: residual-state peak ||h_sink|| / median_t ||h_t|| of a (T, C) tensor (large for a sink)."""
    norms = h.norm(dim=-1)
    return float(norms[sink] / norms.median().clamp_min(torch.finfo(norms.dtype).tiny))


def power_sums(x: torch.Tensor) -> torch.Tensor:
    """(n, sum x, sum x^2, sum x^3, sum x^4), returned and accumulated in float64 so kurtosis can stream over
    windows. Five passes because this runs on every Linear input of every window; the cubic and quartic sums
    are BLAS dot products in the input's dtype (relative error ~1e-6 in float32, far below what kurtosis shows)."""
    flat = x.reshape(-1)
    sq = flat * flat
    count = torch.tensor(float(flat.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([count, flat.sum(dtype=torch.float64),
                        sq.sum(dtype=torch.float64), torch.dot(sq, flat).double(), torch.dot(sq, sq).double()])


def kurtosis_from_sums(sums: torch.Tensor) -> float:
    """Bondarenko et al.: E[(x - mu)^4] / (sigma^4 + 1e-6), not excess kurtosis, from `power_sums`."""
    n, s1, s2, s3, s4 = (float(v) for v in sums)
    mu = s1 / n
    var = max(s2 / n - mu * mu, 0.0)
    m4 = s4 / n - 4 * mu * s3 / n + 6 * mu * mu * s2 / n - 3 * mu**4
    return max(m4, 0.0) / (var * var + KURTOSIS_EPS)


def kurtosis(x: torch.Tensor) -> float:
    """Bondarenko et al.'s kurtosis of a flattened tensor."""
    return kurtosis_from_sums(power_sums(x))


def int8_outlier_columns(col_absmax: torch.Tensor, threshold: float = INT8_OUTLIER_THRESHOLD) -> torch.Tensor:
    """LLM.int8(): indices of the columns j where some |X[t, j]| >= 6.0, given per-column max |X|."""
    return torch.nonzero(col_absmax >= threshold).flatten()


def token_quant_error(x: torch.Tensor, bits: int, absmax: torch.Tensor) -> torch.Tensor:
    """Each token's ||Q(x_t) - x_t||^2 under symmetric round-to-nearest with scale absmax / (2^(bits-1) - 1):
    `absmax` is the tensor's max |x| (per-tensor) or the (T, 1) per-token maxima (per-token). No clamp is
    needed: |x / scale| <= qmax by construction."""
    scale = absmax.clamp_min(torch.finfo(x.dtype).tiny) / (2 ** (bits - 1) - 1)
    y = x / scale
    residual = torch.round(y).sub_(y)
    return torch.linalg.vector_norm(residual, dim=-1).square_() * scale.square().reshape(-1)


def topk_shares(errors: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    """PrefixQuant fig. 1: share of the total squared error held by the k worst tokens, for each k."""
    total = float(errors.sum())
    if total <= 0:
        return [0.0] * len(ks)
    top = errors.topk(min(max(ks), errors.numel())).values.cumsum(0)
    return [float(top[min(k, top.numel()) - 1]) / total for k in ks]


def stretch(token_max: torch.Tensor, sink_mask: torch.Tensor) -> tuple[float, float]:
    """The per-tensor absmax with and without the sink tokens: their ratio is how much a per-tensor int8 scale
    is stretched (resolution lost) by the sinks alone."""
    with_sinks = float(token_max.max())
    rest = token_max[~sink_mask]
    return with_sinks, float(rest.max()) if rest.numel() else 0.0
