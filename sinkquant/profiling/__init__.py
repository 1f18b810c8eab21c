"""`profile(...)`: run a model over calibration windows and report its residual peaks, Linear-input outliers,
attention sinks, quantization-error attribution, where its sinks come from, and the verdict recipes consume."""

from __future__ import annotations

import functools
import os
import platform
import time
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm.auto import tqdm

from sinkquant.artifacts import check_output_dir, library_versions
from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel
from sinkquant.perplexity import resolve_bos
from sinkquant.profiling import metrics
from sinkquant.profiling.collectors import (
    ENTROPY_QUERY_STRIDE,
    LATE_QUERY_FRACTION,
    MIN_QUERIES_FOR_HIDDEN_SINK,
    QUANT_SCHEMES,
    SHORT_WINDOW,
    ProfileCollector,
)
from sinkquant.profiling.probe import origin_probe
from sinkquant.profiling.report import SCHEMA, SCHEMA_VERSION, finalize, write_report
from sinkquant.profiling.verdict import Verdict, build_verdict

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


def profile(
    loaded: LoadedModel,
    stream: TokenStream,
    ctx: int = 512,
    windows: int = 4,
    bos: str = "auto",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    probe: bool = True,
) -> dict[str, Any]:
    """Profile `windows` calibration windows of `ctx` tokens (taken from the end of the text, so they never overlap
    evaluation windows) and return the report; with `out`, also write report.json/.html/.md and the plots there,
    atomically. `bos`: never / per-window / auto (the tokenizer's own convention)."""
    if out is not None:
        check_output_dir(out, overwrite)
    if windows < 1:
        raise SinkquantError(f"windows={windows}: profile at least 1 calibration window")
    add_bos = resolve_bos(bos, loaded)
    limit = loaded.max_context
    if limit is not None and ctx + add_bos > limit:
        raise SinkquantError(f"ctx={ctx} plus {int(add_bos)} BOS exceeds the model's {limit} positions; "
                             f"use --ctx {limit - add_bos} or less")
    plan = _plan(stream, ctx, windows)
    decode = functools.lru_cache(maxsize=None)(lambda i: loaded.tokenizer.decode([i]))
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    clock = time.perf_counter()
    with ProfileCollector(loaded, decode) as collector:
        for index in tqdm(plan.calib_windows, desc="profile", unit="window", disable=not progress):
            ids = stream.windows(ctx, [index])[0]
            if add_bos:
                ids = torch.cat([torch.tensor([loaded.bos_id], dtype=ids.dtype), ids])
            collector.run(ids)
    collect_seconds = time.perf_counter() - clock
    summary = collector.summary()
    probe_result = None
    if probe:
        candidates = [t["id"] for t in summary["residual"]["massive_token_ids"][:3]]
        candidates += [t["id"] for t in summary["token_outliers"]["outlier_token_ids"][:2]]
        base = stream.windows(ctx, [plan.calib_windows[0]])[0].tolist()
        probe_result = origin_probe(loaded, base, candidates, decode)
    verdict = build_verdict(summary, collector.outlier_ids, collector.windows, loaded.bos_id, probe_result, decode)
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
        "verdict": verdict.to_dict(),
        "run": {"started": started, "collect_seconds": collect_seconds,
                "seconds": time.perf_counter() - clock, "torch_threads": torch.get_num_threads(),
                "platform": platform.platform()},
    })
    if out is not None:
        write_report(report, out, overwrite=overwrite)
    return report
