"""Hooks and streaming accumulators: every window is reduced to a few numbers per layer, head and Linear as soon
as it has been seen, so memory does not grow with the number of windows and no attention map is kept.

Attention probabilities come from a custom attention function registered with transformers' AttentionInterface:
it calls the architecture's own eager attention (found in the attention module's own modeling file), reduces the
probabilities at once and returns no weights, so no architecture needs `output_attentions`."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from sinkquant.errors import SinkquantError
from sinkquant.memory import release_freed_memory
from sinkquant.models import LoadedModel, model_device
from sinkquant.profiling import metrics
from sinkquant.profiling.thresholds import HIDDEN_SINK_THRESHOLD

PROBE_NAME = "sinkquant_probe"
QUANT_SCHEMES: dict[str, tuple[int, bool]] = {
    "int8_per_tensor": (8, False),
    "int4_per_tensor": (4, False),
    "int4_per_token": (4, True),
}
TOP_K = (1, 2, 3)
LATE_QUERY_FRACTION = 0.5  # StreamingLLM's "late queries": the second half of the window
SHORT_WINDOW = 64  # Gu et al. publish sink rates at T = 64; causal attention makes them a prefix of ours
MIN_QUERIES_FOR_HIDDEN_SINK = 32  # a key seen by a handful of queries has a large column mean by construction
ENTROPY_QUERY_STRIDE = 8  # mean row entropy from every 8th query: same estimate, an eighth of the cost



class AttentionObserver(Protocol):
    def observe(self, module: nn.Module, weights: torch.Tensor, value: torch.Tensor) -> None: ...


_ACTIVE: list[AttentionObserver] = []


def eager_attention(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The architecture's own eager attention (in the attention module's modeling file): the one implementation
    that returns the probabilities, with every model's own scaling, soft-capping and masking."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise SinkquantError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            "the attention probe supports models whose attention follows transformers' AttentionInterface"
        )
    return eager


def _probe_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Run the module's own eager attention, hand the probabilities to the active collector, drop them."""
    output, weights = eager_attention(module)(module, query, key, value, attention_mask, **kwargs)
    if _ACTIVE:
        _ACTIVE[-1].observe(module, weights, value)
    return output, None


AttentionInterface.register(PROBE_NAME, _probe_attention)
AttentionMaskInterface.register(PROBE_NAME, eager_mask)


@contextmanager
def attention_probe(model: nn.Module, observer: AttentionObserver) -> Iterator[None]:
    """Route the model's attention through the probe, handing each layer's probabilities to `observer`;
    the model's own attention implementation is back on exit, whatever happened."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    _ACTIVE.append(observer)
    try:
        yield
    finally:
        _ACTIVE.remove(observer)
        model.set_attn_implementation(previous)


def _tensor_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(T, C) float view of one window's activations: (1, T, C) in most models, (T, C) inside OPT's MLP."""
    return x.detach().reshape(-1, x.shape[-1]).float()


@dataclass
class ResidualStats:
    """Per decoder layer: the residual stream's peaks (Sun et al.), systematic outliers (An et al.) and the
    norm peak of token 0 (Guo et al.)."""

    n_layers: int
    medians: list[float] = field(default_factory=list)
    top: list[list[tuple[float, int, int, int, int]]] = field(default_factory=list)  # value, window, pos, ch, id
    ids: list[int] = field(default_factory=list)  # the window being observed
    massive_count: list[int] = field(default_factory=list)
    massive_windows: list[int] = field(default_factory=list)
    norm_peak: list[float] = field(default_factory=list)
    sums: list[torch.Tensor] = field(default_factory=list)  # power sums of the layer output (Bondarenko)
    channels: Counter[int] = field(default_factory=Counter)
    window_massive: torch.Tensor | None = None  # positions with a massive entry in any layer, this window
    window_systematic: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.medians = [0.0] * self.n_layers
        self.top = [[] for _ in range(self.n_layers)]
        self.massive_count = [0] * self.n_layers
        self.massive_windows = [0] * self.n_layers
        self.norm_peak = [0.0] * self.n_layers
        self.sums = [torch.zeros(5, dtype=torch.float64) for _ in range(self.n_layers)]

    def observe(self, layer: int, window: int, h: torch.Tensor) -> None:
        h = _tokens(h)
        h_abs = h.abs()
        median = float(h_abs.median())
        self.medians[layer] += median
        values, positions, channels = metrics.top_entries(h_abs, 3)
        merged = self.top[layer] + [(float(v), window, int(p), int(c), self.ids[int(p)])
                                    for v, p, c in zip(values, positions, channels, strict=True)]
        self.top[layer] = sorted(merged, key=lambda e: (-e[0], e[1], e[2], e[3]))[:3]
        massive = metrics.massive_mask(h_abs, median)
        count = int(massive.sum())
        self.massive_count[layer] += count
        self.massive_windows[layer] += count > 0
        if count:
            self.channels.update(torch.nonzero(massive)[:, 1].tolist())
        self.window_massive = massive.any(dim=-1) | (self.window_massive if self.window_massive is not None else False)
        flagged = metrics.systematic_outliers(h_abs)
        self.window_systematic = flagged | (self.window_systematic if self.window_systematic is not None else False)
        self.norm_peak[layer] += metrics.norm_peak(h)
        self.sums[layer] += metrics.power_sums(h).cpu()

    def end_window(self) -> tuple[torch.Tensor, torch.Tensor]:
        massive, systematic = self.window_massive, self.window_systematic
        self.window_massive = self.window_systematic = None
        return massive, systematic


@dataclass
class LinearStats:
    """Per Linear input X: inf-norm and kurtosis (Bondarenko), per-column max (LLM.int8 outlier features),
    token outlier ratio (PrefixQuant), quantization-error attribution, and the per-tensor scale with and
    without the sink tokens."""

    inf_norm: float = 0.0
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    col_absmax: torch.Tensor | None = None
    shares: dict[str, list[float]] = field(default_factory=lambda: {s: [0.0] * len(TOP_K) for s in QUANT_SCHEMES})
    top_error_positions: Counter[int] = field(default_factory=Counter)
    absmax_all: float = 0.0
    absmax_no_sinks: float = 0.0
    outlier_tokens: int = 0
    token_max: torch.Tensor | None = None  # this window only

    def observe(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        x_abs = x.abs()
        self.token_max = x_abs.amax(dim=-1)
        cols = x_abs.amax(dim=0)
        self.col_absmax = cols if self.col_absmax is None else torch.maximum(self.col_absmax, cols)
        absmax = self.token_max.max()
        self.inf_norm = max(self.inf_norm, float(absmax))
        self.sums += metrics.power_sums(x).cpu()
        for scheme, (bits, per_token) in QUANT_SCHEMES.items():
            errors = metrics.token_quant_error(x, bits, self.token_max[:, None] if per_token else absmax)
            for i, share in enumerate(metrics.topk_shares(errors, TOP_K)):
                self.shares[scheme][i] += share
            if scheme == "int8_per_tensor":
                self.top_error_positions[int(errors.argmax())] += 1

    def mirror(self, other: LinearStats) -> None:
        """q/k/v (and gate/up) read the very same tensor in every window, so their accumulators are equal:
        copy them instead of recomputing."""
        self.token_max = other.token_max
        self.col_absmax = other.col_absmax.clone()
        self.inf_norm = other.inf_norm
        self.sums = other.sums.clone()
        self.shares = {s: list(v) for s, v in other.shares.items()}
        self.top_error_positions = Counter(other.top_error_positions)

    def end_window(self, sinks: torch.Tensor) -> torch.Tensor:
        """Fold this window's token maxima into the scale statistics; returns the outlier-token mask."""
        with_sinks, without = metrics.stretch(self.token_max, sinks)
        self.absmax_all = max(self.absmax_all, with_sinks)
        self.absmax_no_sinks = max(self.absmax_no_sinks, without)
        outliers = metrics.outlier_tokens(self.token_max)
        self.outlier_tokens += int(outliers.sum())
        return outliers


@dataclass
class AttentionStats:
    """Per layer and head: alpha_0 (Gu), late-query attention to token 0 (StreamingLLM), column means beyond
    token 0 (ACT hidden sinks), row entropy and value drain (Guo). Only reductions are kept."""

    layer_of: dict[int, int]
    n_layers: int
    alpha0: list[torch.Tensor | None] = field(default_factory=list)
    alpha0_short: list[torch.Tensor | None] = field(default_factory=list)
    late0: list[torch.Tensor | None] = field(default_factory=list)
    entropy: list[torch.Tensor | None] = field(default_factory=list)
    drain: list[torch.Tensor | None] = field(default_factory=list)
    window_alpha0: list[torch.Tensor | None] = field(default_factory=list)
    window_alpha0_short: list[torch.Tensor | None] = field(default_factory=list)
    window_hidden: dict[int, list[float]] = field(default_factory=dict)  # position -> column means > 0.1

    def __post_init__(self) -> None:
        for name in ("alpha0", "alpha0_short", "late0", "entropy", "drain", "window_alpha0", "window_alpha0_short"):
            setattr(self, name, [None] * self.n_layers)

    @staticmethod
    def _add(store: list[torch.Tensor | None], layer: int, value: torch.Tensor) -> None:
        store[layer] = value if store[layer] is None else store[layer] + value

    def observe(self, module: nn.Module, weights: torch.Tensor, value: torch.Tensor) -> None:
        layer = self.layer_of.get(id(module))
        if layer is None:
            return
        attn = weights.detach()[0].float()  # (H, T, T)
        t = attn.shape[-1]
        cols = metrics.column_mean(attn)
        alpha0 = cols[:, 0]
        short = attn[:, :SHORT_WINDOW, 0].mean(dim=-1)
        self.window_alpha0[layer], self.window_alpha0_short[layer] = alpha0, short
        self._add(self.alpha0, layer, alpha0)
        self._add(self.alpha0_short, layer, short)
        self._add(self.late0, layer, attn[:, int(t * LATE_QUERY_FRACTION):, 0].mean(dim=-1))
        self._add(self.entropy, layer, metrics.row_entropy(attn[:, ::ENTROPY_QUERY_STRIDE]).mean(dim=-1))
        self._add(self.drain, layer, metrics.value_drain(value.detach()[0].float()))
        last_key = t - min(MIN_QUERIES_FOR_HIDDEN_SINK, t // 2)
        heads, keys = torch.nonzero(cols[:, 1 : last_key + 1] > HIDDEN_SINK_THRESHOLD, as_tuple=True)
        for h, k in zip(heads.tolist(), keys.tolist(), strict=True):
            self.window_hidden.setdefault(k + 1, []).append(float(cols[h, k + 1]))

    def end_window(self) -> tuple[dict[str, float], dict[str, float], dict[int, list[float]]]:
        """Sink rates of this window (full length and T = 64) and its hidden sinks; resets the window state."""
        seen = [a for a in self.window_alpha0 if a is not None]
        if not seen:
            raise SinkquantError("the attention probe saw no attention layer; is the model's attention supported?")
        full = torch.stack(seen)
        short = torch.stack([a for a in self.window_alpha0_short if a is not None])
        rates = {str(eps): metrics.sink_rate(full, eps) for eps in metrics.SINK_EPS}
        rates_short = {str(eps): metrics.sink_rate(short, eps) for eps in metrics.SINK_EPS}
        hidden = self.window_hidden
        self.window_alpha0 = [None] * self.n_layers
        self.window_alpha0_short = [None] * self.n_layers
        self.window_hidden = {}
        return rates, rates_short, hidden


class ProfileCollector:
    """Installs the hooks and the attention probe on entry, restores the model on exit, and reduces each
    window as it passes; `run(ids)` profiles one window."""

    def __init__(self, loaded: LoadedModel, decode: Callable[[int], str]) -> None:
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.decode = decode
        self.layers = list(self.adapter.decoder_layers(self.model))
        self.linears = self.adapter.linear_layers(self.model)
        # Each layer's MLP down projection, where PrefixQuant counts outlier tokens.
        self.down = [name for name in self.linears if name.endswith(f".{self.adapter.down_proj}")]
        n = len(self.layers)
        self.residual = ResidualStats(n)
        self.linear = {name: LinearStats() for name in self.linears}
        layer_of = {id(m): i for i, m in enumerate(self.adapter.attention_modules(self.model))}
        self.attention = AttentionStats(layer_of, n)
        self.windows = 0
        self.sink_rates: dict[str, list[float]] = defaultdict(list)
        self.sink_rates_short: dict[str, list[float]] = defaultdict(list)
        self.prefix_counts: list[list[int]] = []
        self.outlier_ids: Counter[int] = Counter()
        self.position_ratio: torch.Tensor | None = None
        self.massive_positions: Counter[int] = Counter()
        self.massive_ids: Counter[int] = Counter()
        self.id_seen: Counter[int] = Counter()
        self.buckets: Counter[str] = Counter()
        self.hidden_positions: Counter[int] = Counter()
        self.hidden_ids: Counter[int] = Counter()
        self.hidden_max: dict[int, float] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._probe = attention_probe(self.model, self.attention)
        self._last_input: torch.Tensor | None = None
        self._last_stats: LinearStats | None = None

    def __enter__(self) -> ProfileCollector:
        # Switch attention first: if the model refuses the probe, no hook is left behind on it.
        self._probe.__enter__()
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._residual_hook(index)))
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._probe.__exit__(None, None, None)
        self._last_input = self._last_stats = None

    def _residual_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.residual.observe(index, self.windows, _tensor_output(output))
            # Each layer's probe and statistics free tens of MB of temporaries; a fragmented heap kept them, and
            # profiling SmolLM2's prefix candidates peaked at 2.0x its fp32 weights (0.96x with this trim).
            release_freed_memory()

        return hook

    def _linear_hook(self, name: str) -> Callable[..., None]:
        stats = self.linear[name]

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            if x is self._last_input and self._last_stats is not None:
                stats.mirror(self._last_stats)
            else:
                stats.observe(x)
            self._last_input, self._last_stats = x, stats

        return hook

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> torch.Tensor:
        """Profile one window of token ids (1-D), folding its statistics into the accumulators; returns the
        last position's logits (to check that profiling does not change what the model computes)."""
        device = model_device(self.model)
        self.residual.ids = ids.tolist()
        # One logit is enough (the profile reads activations), which skips most of the LM head's cost.
        logits = self.model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1).logits
        self._last_input = self._last_stats = None
        self._end_window(ids.tolist())
        return logits[0, -1]

    def _end_window(self, ids: list[int]) -> None:
        massive, systematic = self.residual.end_window()
        for pos in torch.nonzero(massive).flatten().tolist():
            self.massive_positions[pos] += 1
            if pos > 0:
                self.massive_ids[ids[pos]] += 1
        self.id_seen.update(ids)
        for pos in torch.nonzero(systematic).flatten().tolist():
            self.buckets[metrics.token_bucket(self.decode(ids[pos]), pos)] += 1
        counts, union, ratio = [], torch.zeros_like(massive), None
        for name, stats in self.linear.items():
            outliers = stats.end_window(massive)
            if name in self.down:
                counts.append(int(outliers.sum()))
                union |= outliers
                r = metrics.token_outlier_ratio(stats.token_max)
                ratio = r if ratio is None else torch.maximum(ratio, r)
            stats.token_max = None
        self.prefix_counts.append(counts)
        self.outlier_ids.update(ids[p] for p in torch.nonzero(union).flatten().tolist() if p > 0)
        self.position_ratio = ratio if self.position_ratio is None else self.position_ratio + ratio
        rates, rates_short, hidden = self.attention.end_window()
        for eps, rate in rates.items():
            self.sink_rates[eps].append(rate)
        for eps, rate in rates_short.items():
            self.sink_rates_short[eps].append(rate)
        for pos, cols in hidden.items():
            self.hidden_positions[pos] += 1
            self.hidden_ids[ids[pos]] += 1
            self.hidden_max[pos] = max(self.hidden_max.get(pos, 0.0), max(cols))
        self.windows += 1

    def _top_ids(self, counter: Counter[int], limit: int = 20) -> list[dict[str, Any]]:
        ranked = sorted(counter, key=lambda i: (-counter[i], i))[:limit]
        return [{"id": i, "text": self.decode(i), "count": counter[i], "seen": self.id_seen[i]} for i in ranked]

    def summary(self) -> dict[str, Any]:
        """Everything accumulated, as plain numbers (averages are over windows)."""
        n = max(self.windows, 1)
        res = self.residual
        layers = []
        for index in range(len(self.layers)):
            median = res.medians[index] / n
            top = [{"value": v, "window": w, "position": p, "channel": c, "token_id": i, "token": self.decode(i)}
                   for v, w, p, c, i in res.top[index]]
            layers.append({
                "layer": index, "median_abs": median, "top": top,
                "top1_over_median": top[0]["value"] / median if median > 0 else None,
                "massive_count": res.massive_count[index], "massive_windows": res.massive_windows[index],
                "norm_peak_token0": res.norm_peak[index] / n,
                "inf_norm": top[0]["value"] if top else 0.0, "kurtosis": metrics.kurtosis_from_sums(res.sums[index]),
            })
        with_peaks = [i for i in range(len(self.layers)) if 2 * res.massive_windows[i] >= n > 0 and
                      res.massive_windows[i] > 0]
        appear = with_peaks[0] if with_peaks else None
        vanish = with_peaks[-1] + 1 if with_peaks and with_peaks[-1] + 1 < len(self.layers) else None
        residual = {
            "layers": layers, "appear_layer": appear, "vanish_layer": vanish,
            "massive_channels": [{"channel": c, "count": k} for c, k in sorted(res.channels.items(),
                                                                              key=lambda e: (-e[1], e[0]))[:10]],
            "massive_positions": [{"position": p, "windows": k} for p, k in sorted(
                self.massive_positions.items(), key=lambda e: (-e[1], e[0]))[:20]],
            "massive_token_ids": self._top_ids(self.massive_ids),
            "systematic_buckets": dict(sorted(self.buckets.items())),
        }
        linears = {}
        for name, st in self.linear.items():
            layer = int(name[len(self.adapter.layers) + 1 :].split(".")[0])
            columns = metrics.int8_outlier_columns(st.col_absmax)
            worst = torch.argsort(st.col_absmax, descending=True, stable=True)[:5].tolist()
            linears[name] = {
                "layer": layer, "down_projection": name in self.down,
                "inf_norm": st.inf_norm, "kurtosis": metrics.kurtosis_from_sums(st.sums),
                "int8_outlier_columns": len(columns), "columns": int(st.col_absmax.numel()),
                "top_columns": [{"channel": c, "absmax": float(st.col_absmax[c])} for c in worst],
                "outlier_tokens_per_window": st.outlier_tokens / n,
                "quant_error_share": {s: {f"top{k}": v / n for k, v in zip(TOP_K, shares, strict=True)}
                                      for s, shares in st.shares.items()},
                "top_error_position": min(st.top_error_positions, key=lambda p: (-st.top_error_positions[p], p)),
                "absmax_with_sinks": st.absmax_all, "absmax_without_sinks": st.absmax_no_sinks,
                "int8_stretch": st.absmax_all / st.absmax_no_sinks if st.absmax_no_sinks > 0 else None,
            }
        att = self.attention
        alpha0 = torch.stack(att.alpha0) / n
        entropy = torch.stack(att.entropy) / n
        late = torch.stack(att.late0) / n
        dormant = metrics.dormant_heads(alpha0, entropy)
        attention = {
            "sink_rate": {eps: sum(v) / len(v) for eps, v in self.sink_rates.items()},
            "sink_rate_t64": {eps: sum(v) / len(v) for eps, v in self.sink_rates_short.items()},
            "alpha0": alpha0.tolist(), "alpha0_t64": (torch.stack(att.alpha0_short) / n).tolist(),
            "first_token_late": [{"layer": i, "mean": float(row.mean()), "std": float(row.std(correction=0))}
                                 for i, row in enumerate(late)],
            "row_entropy": entropy.tolist(), "value_drain": (torch.stack(att.drain) / n).tolist(),
            "dormant_heads": [{"layer": int(l_), "head": int(h), "alpha0": float(alpha0[l_, h]),
                               "entropy": float(entropy[l_, h])} for l_, h in torch.nonzero(dormant).tolist()],
            "hidden_sinks": [{"position": p, "windows": k, "max_column_mean": self.hidden_max[p]}
                             for p, k in sorted(self.hidden_positions.items(), key=lambda e: (-e[1], e[0]))[:20]],
            "hidden_sink_token_ids": self._top_ids(self.hidden_ids),
        }
        token_outliers = {
            "eta": metrics.TOKEN_OUTLIER_ETA, "measured_at": "input of each layer's MLP down projection",
            "counts_per_window": self.prefix_counts, "o": metrics.prefix_length(self.prefix_counts),
            "outlier_token_ids": self._top_ids(self.outlier_ids),
            "position_ratio_mean": (self.position_ratio / n).tolist() if self.position_ratio is not None else [],
        }
        return {"residual": residual, "linears": linears, "attention": attention, "token_outliers": token_outliers}


@torch.no_grad()
def residual_peaks(loaded: LoadedModel, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For one sequence: each position's largest max_c|h| / median|h| over layers, and per layer whether it is
    massive (Sun et al.), as a (layers, T) mask. The probe's cheap test of 'is this position a sink', layer by
    layer (Yan et al. ask from which layer the sink is chosen by position or by content)."""
    ratio: torch.Tensor | None = None
    massive: list[torch.Tensor] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal ratio
        h_abs = _tokens(_tensor_output(output)).abs()
        median = h_abs.median()
        token_max = h_abs.amax(dim=-1)
        r = token_max / median.clamp_min(torch.finfo(token_max.dtype).tiny)
        ratio = r if ratio is None else torch.maximum(ratio, r)
        massive.append(metrics.massive_mask(token_max, median))

    handles = [layer.register_forward_hook(hook) for layer in loaded.adapter.decoder_layers(loaded.model)]
    try:
        device = model_device(loaded.model)
        loaded.model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return ratio, torch.stack(massive)
