"""`--recipe auto`: search a static recipe on calibration data only, keeping each step only if it pays.

Objective: the mean KL divergence KL(fp32 || quantized) of the next-token distributions over score windows.
It is what perplexity degradation is made of (the expected log-ratio the quantized model adds on text the fp
model predicts), needs no labels, is zero only when the quantized model predicts exactly like fp32, and covers
the prefix's own fp cost (the quantized model sees prefix + window, the reference sees the window alone).

Data: the last `calib_windows` windows of the text calibrate the scales (as every recipe does); the
`score_windows` windows just before them score the candidates, so no candidate is judged on the tokens its
scales were fitted to, and evaluation windows (taken from the start of the text) are never touched.

Search (coordinate descent, in the engine's step order, starting from the naive scheme):
  prefix max_tokens in PREFIX_TOKENS -> smooth alpha in ALPHAS -> exceptions: the smallest `top` in
  EXCEPTION_TOPS that meets the error budget (else the best) -> clip on/off.
Each choice is kept only if it lowers the objective, so the result is never worse than naive on the score
windows; the trace records every candidate tried and its objective, and the chosen recipe is a normal
recipe (YAML) that reproduces the result without searching again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sinkquant.artifacts import atomic_write_json, atomic_write_text
from sinkquant.data import TokenStream, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel

SCHEMES: dict[str, dict[str, Any]] = {
    "w8a8-static": {"weights": {"bits": 8, "granularity": "channel"},
                    "activations": {"bits": 8, "mode": "static", "observer": "absmax"}},
}
PREFIX_TOKENS = (1, 2, 4)
ALPHAS = (0.3, 0.5, 0.7)
EXCEPTION_TOPS = (1, 2, 4, 8, 16)
# Error budget for exceptions: stop adding fp inputs once KL is below this (nats per token); ~1% perplexity.
KL_BUDGET = 0.01


def score_windows(stream: TokenStream, ctx: int, calib_windows: int, count: int) -> torch.Tensor:
    """The `count` windows just before the last `calib_windows` (those calibrate): calibration data only."""
    plan = plan_windows(stream, ctx, max_windows=1, calib_windows=calib_windows + count)
    return stream.windows(ctx, list(plan.calib_windows[:count]))


@torch.no_grad()
def kl_to_fp(loaded: LoadedModel, quantized, windows: torch.Tensor, reference: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(fp32 || quantized) of the next-token distribution."""
    total, tokens = 0.0, 0
    for window, fp_logp in zip(windows, reference, strict=True):
        cache = quantized.prefix.cache_for_batch(1) if quantized.prefix is not None else None
        logits = quantized.model(input_ids=window[None], past_key_values=cache, use_cache=cache is not None).logits[0]
        q_logp = F.log_softmax(logits.float(), dim=-1)
        total += float(F.kl_div(q_logp, fp_logp, log_target=True, reduction="sum"))
        tokens += window.shape[0]
    return total / tokens


def _recipe(scheme: dict[str, Any], steps: list[dict[str, Any]], calib_windows: int) -> dict[str, Any]:
    return {"name": "auto", "description": "searched by sinkquant.search on calibration data (see trace)",
            "steps": steps, "scheme": scheme, "calibration": {"windows": calib_windows}}


def search_recipe(
    loaded: LoadedModel,
    stream: TokenStream,
    ctx: int,
    scheme: str = "w8a8-static",
    calib_windows: int = 8,
    score_count: int = 2,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (recipe dict for `parse_recipe`, trace). See the module doc for the objective and the search."""
    from sinkquant.recipes import apply_recipe
    from sinkquant.recipes.apply import calibration_windows
    from sinkquant.recipes.prefix import calibration_profile
    from sinkquant.recipes.schema import parse_recipe

    if scheme not in SCHEMES:
        raise SinkquantError(f"--scheme {scheme!r}: the auto search knows {', '.join(SCHEMES)}")
    start = time.perf_counter()
    windows = score_windows(stream, ctx, calib_windows, score_count)
    with torch.no_grad():
        reference = [F.log_softmax(loaded.model(input_ids=w[None], use_cache=False).logits[0].float(), dim=-1)
                     for w in windows]
    # One profile of the calibration windows serves every prefix candidate (the prefix step reads it).
    base = parse_recipe(_recipe(SCHEMES[scheme], [], calib_windows), "auto")
    report = calibration_profile(loaded, calibration_windows(stream, base, ctx))
    tried: list[dict[str, Any]] = []
    bar = tqdm(desc="auto recipe", unit="candidate", disable=not progress)

    def objective(steps: list[dict[str, Any]]) -> float:
        recipe = parse_recipe(_recipe(SCHEMES[scheme], steps, calib_windows), "auto")
        quantized = apply_recipe(loaded, recipe, stream, ctx=ctx, profile_report=report)
        value = kl_to_fp(loaded, quantized, windows, reference)
        tried.append({"steps": steps, "kl": value})
        bar.update(1)
        return value

    chosen: list[dict[str, Any]] = []
    best = objective(chosen)
    ablation = [{"step": "naive", "kl": best, "kept": True}]

    def stage(name: str, options: list[dict[str, Any]], enough: Callable[[float], bool] = lambda v: False) -> None:
        """Try each option on top of what is chosen; keep the best if it lowers the objective. `enough`
        stops at the first option that meets it (options ordered smallest first)."""
        nonlocal best, chosen
        stage_best, stage_steps = best, None
        for option in options:
            value = objective([*chosen, option])
            if value < stage_best:
                stage_best, stage_steps = value, [*chosen, option]
            if value < best and enough(value):
                break
        kept = stage_steps is not None
        ablation.append({"step": name, "kl": stage_best, "kept": kept,
                         "choice": stage_steps[-1] if kept else None})
        if kept:
            best, chosen = stage_best, stage_steps

    stage("prefix", [{"prefix": {"tokens": "profile", "max_tokens": n}} for n in PREFIX_TOKENS])
    stage("smooth", [{"smooth": {"alpha": a}} for a in ALPHAS])
    stage("exceptions", [{"exceptions": {"top": k}} for k in EXCEPTION_TOPS], enough=lambda v: v <= KL_BUDGET)
    stage("clip", [{"clip": {}}])
    bar.close()
    trace = {"objective": "mean KL(fp32 || quantized) of next-token distributions, nats per token",
             "score_windows": list(windows.shape), "calib_windows": calib_windows, "kl_budget": KL_BUDGET,
             "ablation": ablation, "tried": tried, "seconds": time.perf_counter() - start}
    return _recipe(SCHEMES[scheme], chosen, calib_windows), trace


def write_recipe(recipe: dict[str, Any], trace: dict[str, Any], path: str | Path) -> list[Path]:
    """The chosen recipe as a normal YAML file (load_recipe reads it; no search runs again) and the search's
    trace beside it as `<stem>.trace.json`, both written atomically."""
    import yaml

    path = Path(path)
    trace_path = path.with_name(f"{path.stem}.trace.json")
    header = (f"# Chosen by sinkquant.search (objective: {trace['objective']}); the candidates tried and their\n"
              f"# objective values are in {trace_path.name}.\n")
    return [atomic_write_text(path, header + yaml.safe_dump(recipe, sort_keys=False)),
            atomic_write_json(trace_path, trace)]
