"""`profile(...)`: run a model over calibration windows and report its residual peaks, Linear-input outliers,
attention sinks, quantization-error attribution, where its sinks come from, and the verdict recipes consume."""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm.auto import tqdm

from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.io import check_output_dir, library_versions
from sinkquant.memory import release_freed_memory
from sinkquant.models import LoadedModel, bos_evidence, model_device
from sinkquant.perplexity import resolve_bos
from sinkquant.profiling import metrics
from sinkquant.profiling.collectors import (
    ENTROPY_QUERY_STRIDE,
    LATE_QUERY_FRACTION,
    MIN_QUERIES_FOR_HIDDEN_SINK,
    QUANT_SCHEMES,
    SHORT_WINDOW,
    AttentionStats,
    ProfileCollector,
    attention_probe,
)
from sinkquant.profiling.context import context_sweep
from sinkquant.profiling.domains import domain_heads
from sinkquant.profiling.interventions import INTERVENTIONS, massive_interventions
from sinkquant.profiling.probe import origin_probe
from sinkquant.profiling.report import SCHEMA, SCHEMA_VERSION, finalize, write_report
from sinkquant.profiling.verdict import Verdict, build_verdict, recommend

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Verdict", "profile"]


# Choices the papers leave open, stated in every report so its numbers can be compared.
CONVENTIONS: dict[str, str] = {
    "positions": "input positions; with BOS added, position 0 is BOS",
    "layers": "0-based decoder layer outputs (the residual stream after layer i)",
    "sink_token": "a position holding a massive residual activation (Sun et al.) in any layer of that window",
    "sink_rate": f"per window, then averaged; sink_rate_t64 uses the first {SHORT_WINDOW} queries (Gu et al.'s T)",
    "first_token_late": f"queries t >= {LATE_QUERY_FRACTION} T; mean and std over heads, averaged over windows",
    "hidden_sinks": f"keys 1..T-q seen by at least q = min({MIN_QUERIES_FOR_HIDDEN_SINK}, T/2) queries",
    "value_drain": "per key-value head (before grouped-query repetition), sink = position 0",
    "dormant_head": f"alpha_0 >= {metrics.DORMANT_ALPHA} and mean row entropy <= {metrics.DORMANT_ENTROPY} nat "
                    f"(entropy averaged over every {ENTROPY_QUERY_STRIDE}th query)",
    "token_outliers": "PrefixQuant counts at each layer's MLP down-projection input; ids counted once per position",
    "quant_error": f"schemes {', '.join(QUANT_SCHEMES)}: symmetric round-to-nearest, absmax scale of each window",
    "int8_stretch": "max over windows of absmax with the sink tokens / without them",
    "kurtosis": "pooled over all tokens and channels of all windows (streaming power sums)",
    "domains": "with several named texts, the first is profiled in full; alpha_0 and row entropy per head are "
               "measured on the same number of windows of every text (windows from each text's end)",
    "interventions": f"{', '.join(INTERVENTIONS)} at the output of the layer where massive activations appear, "
                     "on the entries massive there in the peak channels; mean = each channel's mean massive value "
                     "over the profiled windows; perplexity over those same windows",
    "context_sweep": "one sequence from the end of the text cut at each length; with BOS, BOS + length-1 tokens; "
                     "formed = token 0 massive and the largest residual peak in some layer",
}


def _model_facts(loaded: LoadedModel) -> dict[str, Any]:
    config = loaded.model.config
    attention = loaded.adapter.attention_modules(loaded.model)
    return {
        "spec": loaded.spec, **loaded.source, "adapter": loaded.adapter.name, "model_type": config.model_type,
        "layers": len(attention), "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "linear_inputs": len(loaded.adapter.linear_layers(loaded.model)),
    }


def _plan(stream: TokenStream, ctx: int, windows: int) -> WindowPlan:
    """Calibration windows from the end of the text; a text of exactly `windows` windows is all calibration
    (profiling needs no evaluation window, e.g. when a recipe profiles its own calibration set)."""
    total = stream.n_windows(ctx)
    if 0 < total <= windows:
        if total < windows:
            raise SinkquantError(f"text has {total} windows of ctx={ctx}, fewer than windows={windows}; "
                                 f"use --windows {total} or less, or a smaller --ctx")
        return WindowPlan(ctx=ctx, eval_windows=(), calib_windows=tuple(range(total)))
    return plan_windows(stream, ctx, calib_windows=windows)


def _named(stream: TokenStream | Mapping[str, TokenStream]) -> dict[str, TokenStream]:
    if isinstance(stream, TokenStream):
        return {"text": stream}
    if not isinstance(stream, Mapping) or not stream:
        raise SinkquantError("stream must be a TokenStream or a non-empty mapping of names to TokenStreams")
    for name, value in stream.items():
        if not isinstance(name, str) or not name.strip():
            raise SinkquantError(f"text name {name!r} is not valid; valid: a non-empty string such as 'wikitext'")
        if not isinstance(value, TokenStream):
            raise SinkquantError(f"text {name!r} is a {type(value).__name__}; "
                                 "valid: a TokenStream (sinkquant.tokenize)")
    return dict(stream)


@torch.no_grad()
def _head_stats(loaded: LoadedModel, stream: TokenStream, plan: WindowPlan, add_bos: bool) -> AttentionStats:
    """alpha_0 and row entropy per head over one text's windows (the attention part of the collector only)."""
    layer_of = {id(m): i for i, m in enumerate(loaded.adapter.attention_modules(loaded.model))}
    stats = AttentionStats(layer_of, len(layer_of))
    device = model_device(loaded.model)
    with attention_probe(loaded.model, stats):
        for ids in _window_ids(loaded, stream, plan, add_bos):
            loaded.model(input_ids=ids[None].to(device), use_cache=False, logits_to_keep=1)
            stats.end_window()
    return stats


def _window_ids(loaded: LoadedModel, stream: TokenStream, plan: WindowPlan, add_bos: bool) -> list[torch.Tensor]:
    out = []
    for index in plan.calib_windows:
        ids = stream.windows(plan.ctx, [index])[0]
        if add_bos:
            ids = torch.cat([torch.tensor([loaded.bos_id], dtype=ids.dtype), ids])
        out.append(ids)
    return out


def profile(
    loaded: LoadedModel,
    stream: TokenStream | Mapping[str, TokenStream],
    ctx: int = 512,
    windows: int = 4,
    bos: str = "auto",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    probe: bool = True,
    interventions: bool = False,
    context_lengths: tuple[int, ...] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Profile `windows` calibration windows of `ctx` tokens (taken from the end of the text, so they never overlap
    evaluation windows) and return the report; with `out`, also write report.json/.html/.md and the plots there,
    atomically. `bos`: never / per-window / auto (the tokenizer's own convention).

    `stream` may be several named texts ({"wikitext": a, "numbers": b}): the first is profiled in full, and every
    head's sink share and entropy is compared across them (Guo et al.'s active and dormant heads; one attention
    pass per extra text). Off by default because each costs several times the collection: `interventions`
    re-evaluates the profiled windows with the massive activations zeroed / set to their mean / a random control
    (Sun et al.; 4 perplexity passes); `context_lengths` (e.g. context.CONTEXT_LENGTHS) adds Barbero et al.'s
    sweep (eager attention up to the longest length, with and without BOS)."""
    if out is not None:
        check_output_dir(out, overwrite)
    if windows < 1:
        raise SinkquantError(f"windows={windows}: profile at least 1 calibration window")
    texts = _named(stream)
    primary, stream = next(iter(texts.items()))
    add_bos = resolve_bos(bos, loaded)
    limit = loaded.max_context
    if limit is not None and ctx + add_bos > limit:
        raise SinkquantError(f"ctx={ctx} plus {int(add_bos)} BOS exceeds the model's {limit} positions; "
                             f"use --ctx {limit - add_bos} or less")
    plan = _plan(stream, ctx, windows)
    plans = {primary: plan}
    for name, text in list(texts.items())[1:]:
        try:
            plans[name] = _plan(text, ctx, windows)
        except SinkquantError as error:
            raise SinkquantError(f"text {name!r}: {error}") from None
    decode = functools.lru_cache(maxsize=None)(lambda i: loaded.tokenizer.decode([i]))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    with ProfileCollector(loaded, decode) as collector:
        for ids in tqdm(_window_ids(loaded, stream, plan, add_bos), desc="profile", unit="window",
                        disable=not progress):
            release_freed_memory()
            collector.run(ids)
    release_freed_memory()
    collect_seconds = time.perf_counter() - clock
    seconds: dict[str, float] = {}
    summary = collector.summary()
    probe_result = None
    if probe:
        candidates = [t["id"] for t in summary["residual"]["massive_token_ids"][:3]]
        candidates += [t["id"] for t in summary["token_outliers"]["outlier_token_ids"][:2]]
        base = stream.windows(ctx, [plan.calib_windows[0]])[0].tolist()
        probe_result = origin_probe(loaded, base, candidates, decode)

    verdict = build_verdict(summary, collector.outlier_ids, collector.windows, loaded.bos_id, probe_result, decode,
                            bos_trained=bos_evidence(loaded)["trained"])
    domains = None
    if len(texts) > 1:
        clock_section = time.perf_counter()
        stats = {name: collector.attention if name == primary else _head_stats(loaded, text, plans[name], add_bos)
                 for name, text in texts.items()}
        n = len(plan.calib_windows)
        domains = domain_heads({k: torch.stack(v.alpha0) / n for k, v in stats.items()},
                               {k: torch.stack(v.entropy) / n for k, v in stats.items()})
        domains["data"] = {name: {"sha256": text.text_sha256, **text.source, **plans[name].describe(),
                                  "tokens": int(text.ids.numel())} for name, text in texts.items()}
        seconds["domains"] = time.perf_counter() - clock_section
    intervention = None
    if interventions:
        clock_section = time.perf_counter()
        layer = summary["residual"]["appear_layer"]
        if layer is None or not verdict.peak_channels:
            intervention = {"layer": None, "note": "no massive activation in most windows: nothing to intervene on"}
        else:
            intervention = massive_interventions(loaded, stream, ctx, plan.calib_windows, bos, layer,
                                                 verdict.peak_channels, seed=seed, progress=progress)
        seconds["interventions"] = time.perf_counter() - clock_section
    sweep = None
    if context_lengths:
        clock_section = time.perf_counter()
        sweep = context_sweep(loaded, stream, tuple(context_lengths), progress=progress)
        seconds["context_sweep"] = time.perf_counter() - clock_section
    report = finalize({
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": _model_facts(loaded),
        "data": {"sha256": stream.text_sha256, **stream.source, **plan.describe(),
                 "calib_window_indices": list(plan.calib_windows), "tokens": int(stream.ids.numel())},
        "ctx": ctx,
        "bos": {"policy": bos, "added": add_bos, "bos_id": loaded.bos_id, "tokenizer_adds_bos": loaded.adds_bos},
        "versions": library_versions(),
        "sources": metrics.SOURCES,
        "conventions": CONVENTIONS,
        **summary,
        "probe": probe_result,
        "domains": domains,
        "interventions": intervention,
        "context_sweep": sweep,
        "seed": seed,
        "verdict": verdict.to_dict(),
        "run": {"started": started, "collect_seconds": collect_seconds, "section_seconds": seconds,
                "seconds": time.perf_counter() - clock, "torch_threads": torch.get_num_threads(),
                "platform": platform.platform()},
    })
    report["recommendation"] = recommend(report)
    if out is not None:
        write_report(report, out, overwrite=overwrite)
    return report
