"""`--recipe auto`: the profile proposes candidates, a search on calibration data chooses the recipe.

Objective: the mean KL divergence, per scored token, of the quantized model's next-token distribution from the
fp32 model's (BOS policy `auto`, no prefix: the model as users run it) on held-out calibration windows. It is
zero only when quantization changes nothing the model predicts, it counts a prefix that hurts the fp model as
well as quantization error, and (unlike the NLL of the text) it cannot be lowered by a change that happens to
fit these windows better than fp32 does.

Windows: the last `calib_windows` windows of the text (the region the engine calibrates on, never evaluated).
The first `score_windows` of them score; the rest calibrate the chosen recipe; the search itself calibrates
each candidate on the last `search_windows` of those (short search windows keep the cost bounded). Calibrating
the chosen recipe on those 2 windows too was tried: on SmolLM2's torch-docs text its static scales then missed
ranges the evaluation windows reach (+5.7% against +3.8% for the same recipe calibrated on 7).

Search, each stage kept only if it lowers the objective beyond its noise (more than `NOISE_Z` standard errors
of the paired per-token difference; each candidate's `z` is in the trace, each stage in its `ablation`):
    naive scheme -> prefix length 0..max (the prefix step's own selection from the verdict, lengthened while
    each token pays; where none pays, keep_sink on the verdict's sink positions)
    -> rotation in front of that prefix
    -> smoothing at the grid's first alpha (only where rotation was not kept)
    -> exception layers (the smallest top-k, ranked by each layer's measured output error, whose objective meets
    `budget`, at most `max_exceptions`; a release needs no recalibration)
    -> the rest of the alpha grid, walked from the first value with those exceptions in every candidate (only
    where smoothing was kept)
    -> each smoothing group's own alpha (the smooth step's layer-wise choice on `layer_alphas`)
    -> clipping on/off (on the calibrated model, undone by restoring the scales)
    -> [int4 schemes] GPTQ weights in place of round-to-nearest.
Alpha and exceptions interact, so alpha is walked after them: on SmolLM2 alpha 0.65 beat 0.5 without exceptions
(0.111 against 0.127 nats) and lost with them (0.094 against 0.071); walking alpha first and keeping 0.65 gave
+5.1% perplexity on the evaluation windows, 0.5 with exceptions +2.4%."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine.apply import QuantizedModel, apply_recipe
from sinkquant.errors import SinkquantError
from sinkquant.io import atomic_write_json, atomic_write_text
from sinkquant.models import LoadedModel
from sinkquant.perplexity import Prefix
from sinkquant.profiling.profiler import profile
from sinkquant.profiling.verdict import Verdict
from sinkquant.quant.scheme import KeepPolicy
from sinkquant.quant.simulate import QuantLinear
from sinkquant.recipe import Recipe, parse_recipe
from sinkquant.search.space import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_EXCEPTIONS,
    SCORE_WINDOWS,
    SEARCH_WINDOWS,
    BaseScheme,
    base_scheme,
    check_budget,
    check_calib_windows,
    check_max_exceptions,
)
from sinkquant.search.targets import check_target
from sinkquant.steps.clip import Clip
from sinkquant.steps.exceptions import MAX_SHARE
from sinkquant.steps.prefix import profile_candidates, with_bos
from sinkquant.steps.session import Session

OBJECTIVE = "mean KL(fp32 || quantized) of the next-token distribution, nats per scored token"


# A candidate replaces the best so far only if it lowers the objective by more than NOISE_Z standard errors of
# the paired per-token difference (`improvement_z`), in runs of NOISE_BLOCK tokens. Keeping every lowering chose on
# noise: with 32 exceptions on SmolLM2's torch-docs text, alpha 0.35 beat 0.5 by 0.0005 nats (0.0683 against
# 0.0688, under 1%) and cost the evaluation windows 0.8 points (+4.36% against +3.54% with alpha 0.5).
NOISE_Z = 2.0
NOISE_BLOCK = 32


@torch.no_grad()
def _forward(model: torch.nn.Module, window: torch.Tensor, context: list[int], prefix: Prefix | None,
             logits_to_keep: int) -> torch.Tensor:
    """One window [ctx] as perplexity sees it: behind the prefix's KV cache, or behind the BOS context."""
    device = next(model.parameters()).device
    if prefix is not None and prefix.cache is not None:
        inputs, past = window[None].to(device), prefix.cache_for_batch(1)
    else:
        inputs, past = torch.cat([torch.tensor(context, dtype=window.dtype), window])[None].to(device), None
    return model(input_ids=inputs, past_key_values=past, use_cache=past is not None,
                 logits_to_keep=logits_to_keep).logits


def _log_probs(model: torch.nn.Module, window: torch.Tensor, context: list[int], prefix: Prefix | None
               ) -> torch.Tensor:
    """log p(token t+1 | ..t) for t = 0..ctx-2 of one window [ctx]: what perplexity scores, as [ctx-1, vocab]."""
    logits = _forward(model, window, context, prefix, logits_to_keep=window.numel())
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


def _recipe(name: str, description: str, steps: list[dict[str, Any]], scheme: dict[str, Any], windows: int,
            ctx: int, backend: str = "simulated") -> Recipe:
    return parse_recipe({"name": name, "description": description, "backend": backend, "steps": steps,
                         "scheme": scheme, "calibration": {"windows": windows, "ctx": ctx}}, f"auto recipe {name}")



def _prefix_step(loaded: LoadedModel, ids: list[int]) -> dict[str, Any]:
    """An explicit prefix that the prefix step honours as given (BOS only where the list starts with it). Its
    fp-loss check is off: the objective (KL to the fp model without prefix) already counts what a prefix does to
    the fp model, and the check would cost four fp forwards per candidate."""
    bos = "auto" if ids[:1] == [loaded.bos_id] else "never"
    return {"prefix": {"tokens": list(ids), "max_tokens": len(ids), "bos": bos, "check": False}}


def _prefix_candidates(loaded: LoadedModel, report: dict[str, Any], windows: torch.Tensor, max_prefix: int
                       ) -> list[list[int]]:
    """The prefix step's own selection (BOS where the model is trained with it, then PrefixQuant's content
    tokens, with their fallbacks) cut at lengths 1..max_prefix. The verdict's prefix alone is empty where a
    model has no trained BOS and the profile counts no outlier token (Qwen2.5), and then no prefix was tried."""
    content, _ = profile_candidates(loaded, windows, report)
    ranked = with_bos(loaded, content, "auto")
    return [ranked[:k] for k in range(1, min(max_prefix, len(ranked)) + 1)]


def _quantized_layers(quantized: QuantizedModel) -> dict[str, QuantLinear]:
    return {n: m for n, m in quantized.model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def _exception_ranking(quantized: QuantizedModel, layers: dict[str, QuantLinear], windows: torch.Tensor,
                       context: list[int]) -> list[str]:
    """Static-activation layers, largest relative output error ||W (Q(x) - x)||^2 / ||W x||^2 first, measured on
    the search's calibration windows with the inputs each layer sees in the quantized model. The exceptions
    step's own `top` order (widest calibrated range) picks attention o_proj on Gemma 3, while its error sits in
    the MLP down_proj inputs: releasing the 16 widest inputs took the objective from 0.065 to 0.055 nats, the 16
    with the largest error to 0.023."""
    static = {n: m for n, m in layers.items() if m.activations is not None and m.act_scale is not None}
    error = dict.fromkeys(static, 0.0)
    signal = dict.fromkeys(static, 0.0)

    def make_hook(name: str, layer: QuantLinear):
        def hook(_module, args, out):  # out = W Q(x) + b: one more GEMM, W x, gives both sums
            exact = F.linear(args[0], layer.dense_weight(out.dtype), layer.bias)
            error[name] += float((out - exact).pow(2).sum())
            signal[name] += float((exact if layer.bias is None else exact - layer.bias).pow(2).sum())

        return hook

    handles = [m.register_forward_hook(make_hook(n, m)) for n, m in static.items()]
    try:
        for window in windows:
            _forward(quantized.model, window, context, quantized.prefix, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(static, key=lambda n: (-error[n] / max(signal[n], 1e-30), n))


def _counts(limit: int, meets: Callable[[int], bool]) -> int:
    """The smallest k in 1..limit with meets(k), given meets(limit) and meets monotone: doubling, then bisection."""
    k, previous = 1, 0
    while not meets(k):
        previous, k = k, min(2 * k, limit)
    low, high = previous + 1, k
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return high


class _Search:
    """Candidates, their objective values and seconds, and the best so far."""

    def __init__(self, loaded: LoadedModel, stream: TokenStream, base: BaseScheme, ctx: int, search_windows: int,
                 objective: Objective, report: dict[str, Any] | None, progress: bool,
                 refuse: Callable[[Recipe], list[str]] | None = None) -> None:
        self.loaded, self.stream, self.base, self.ctx = loaded, stream, base, ctx
        self.refuse = refuse or (lambda _recipe: [])  # what the target runtime cannot run: never tried
        self.search_windows, self.objective, self.report = search_windows, objective, report
        self.calibration = stream.windows(ctx, list(plan_windows(stream, ctx, 1, search_windows).calib_windows))
        self.candidates: list[dict[str, Any]] = []
        self.bar = tqdm(desc="auto recipe", unit="candidate", disable=not progress, leave=False)
        self.best: dict[str, Any] | None = None
        self.best_tokens: torch.Tensor | None = None  # the best's per-token KL, for the paired comparison
        self.model: QuantizedModel | None = None
        self.memo: dict[Any, Any] = {}  # every candidate is a copy of the untouched loaded model

    def record(self, stage: str, what: dict[str, Any], measured: tuple[dict[str, float], torch.Tensor],
               start: float) -> dict[str, Any]:
        """Log a candidate with `z`, its improvement over the best so far in standard errors (None for the
        first); `beats` says whether that is beyond the noise."""
        score, tokens = measured
        z = None if self.best_tokens is None else improvement_z(tokens, self.best_tokens)
        entry = {"stage": stage, **what, **score, "z": z, "seconds": time.perf_counter() - start}
        self.candidates.append(entry)
        self.bar.update(1)
        self.bar.set_postfix(stage=stage, kl=f"{score['objective']:.4f}")
        return entry

    @staticmethod
    def beats(entry: dict[str, Any]) -> bool:
        return entry["z"] is None or entry["z"] > NOISE_Z

    def kept(self, step: str) -> dict[str, Any] | None:
        """The best's settings for `step`, None where it has none: later stages depend on what was kept."""
        return next((s[step] for s in self.best["steps"] if step in s), None)

    def promote(self, best: dict[str, Any], tokens: torch.Tensor) -> None:
        """The new best and its per-token KL, which later candidates are paired against."""
        self.best, self.best_tokens = best, tokens

    def refused(self, stage: str, what: dict[str, Any], steps: list[dict[str, Any]],
                scheme: dict[str, Any] | None = None) -> bool:
        """A candidate the target cannot run is logged with the reasons (`refused`) and never quantized."""
        recipe = _recipe(f"search-{len(self.candidates)}", "auto recipe candidate", steps,
                         scheme or self.base.scheme, self.search_windows, self.ctx)
        reasons = self.refuse(recipe)
        if reasons:
            self.candidates.append({"stage": stage, **what, "refused": reasons})
        return bool(reasons)

    def calibrated(self, stage: str, steps: list[dict[str, Any]], scheme: dict[str, Any] | None = None) -> bool:
        """Quantize and calibrate a candidate on the search windows (the base scheme unless `scheme` is given);
        keep it if it beats the best so far beyond the objective's noise."""
        start = time.perf_counter()
        what = {"steps": steps} if scheme is None else {"steps": steps, "scheme": scheme}
        if self.refused(stage, what, steps, scheme):
            return False
        recipe = _recipe(f"search-{len(self.candidates)}", "auto recipe candidate", steps,
                         scheme or self.base.scheme, self.search_windows, self.ctx)
        quantized = apply_recipe(self.loaded, recipe, self.stream, self.ctx, profile_report=self.report, copy=True,
                                 memo=self.memo)
        measured = self.objective.measure(quantized.model, quantized.prefix)
        entry = self.record(stage, what, measured, start)
        if not self.beats(entry):
            return False
        self.promote({"scheme": self.base.scheme, **entry, "exceptions": [], "clip": False}, measured[1])
        self.model = quantized
        return True


def _ablation(stage: str, before: float, after: float) -> dict[str, Any]:
    return {"step": stage, "before": before, "after": after, "kept": after < before}


def _skipped(stage: str, before: float, reason: str) -> dict[str, Any]:
    """A stage not tried, with why: the ablation still lists every stage in order."""
    return {**_ablation(stage, before, before), "reason": reason}


def _budget_met(stage: str, before: float, budget: float, ablation: list[dict[str, Any]]) -> bool:
    """Rotation, exceptions, clipping and GPTQ run only while the budget is unmet; a skipped one is recorded."""
    if before > budget:
        return False
    ablation.append(_skipped(stage, before, "budget already met"))
    return True


def auto_recipe(
    loaded: LoadedModel, stream: TokenStream, scheme: str = "w8a8-static", ctx: int = 512, calib_windows: int = 8,
    budget: float = DEFAULT_BUDGET, progress: bool = True, *, max_exceptions: int = DEFAULT_MAX_EXCEPTIONS,
    score_windows: int = SCORE_WINDOWS, search_windows: int = SEARCH_WINDOWS, target: str = "simulated",
) -> tuple[Recipe, dict[str, Any]]:
    """Search a recipe for `loaded` on calibration windows only; returns it with the trace of what was tried.
    The loaded model is left untouched (every candidate works on a copy). Only candidates that `target`
    (sinkquant.search.targets) runs are tried; the chosen recipe names the target's backend. The CLI's default
    target is native; this function's stays simulated, the search's research setting."""
    chosen = check_target(target, scheme)
    base, budget = base_scheme(scheme), check_budget(budget)
    max_exceptions = check_max_exceptions(max_exceptions)
    final_windows = check_calib_windows(calib_windows, score_windows, search_windows) - score_windows
    start = time.perf_counter()
    torch.manual_seed(0)
    region = list(plan_windows(stream, ctx, max_windows=1, calib_windows=calib_windows).calib_windows)
    objective = Objective(loaded, stream.windows(ctx, region[:score_windows]))
    search_ids = region[-search_windows:]
    search_sample = stream.windows(ctx, search_ids)
    report = _profile(loaded, search_sample)
    search = _Search(loaded, stream, base, ctx, search_windows, objective, report, progress,
                     refuse=lambda recipe: chosen.refusals(recipe, loaded.model))
    ablation: list[dict[str, Any]] = []

    try:
        search.calibrated("naive", [])
        naive = search.best["objective"]
        for ids in _prefix_candidates(loaded, report, search_sample, base.max_prefix):  # longer while it pays
            if not search.calibrated("prefix", [_prefix_step(loaded, ids)]) and len(ids) > 1:
                break
        ablation.append(_ablation("prefix", naive, search.best["objective"]))
        sinks = Verdict.of(report).sink_positions
        if not search.best["steps"] and sinks:  # no prefix pays: keep the verdict's sink positions instead
            search.calibrated("keep_sink", [{"keep_sink": {"positions": sinks}}])
            ablation.append(_ablation("keep_sink", naive, search.best["objective"]))
        _rotate(search, budget, ablation)
        _smooth(search, ablation)
        _exceptions(search, budget, max_exceptions, ablation)
        _alpha_walk(search, ablation)
        _layer_alpha(search, ablation)
        _clip(search, budget, ablation)
        if base.gptq:
            _gptq(search, budget, ablation)
    finally:
        search.bar.close()

    best = search.best
    kept = [s["step"] for s in ablation if s["kept"]] or ["none"]
    recipe = _recipe(f"auto-{scheme}", f"Searched by --recipe auto for {loaded.spec} on calibration data "
                     f"(kept: {', '.join(kept)}); see the trace beside this file.", _steps(search),
                     best["scheme"], final_windows, ctx, backend=chosen.backend)
    trace = {
        "scheme": scheme, "target": target, "model": loaded.spec, "data_sha256": stream.text_sha256, "ctx": ctx,
        "budget": budget,
        "max_exceptions": max_exceptions,
        "objective": OBJECTIVE,
        "windows": {"score": region[:score_windows], "search_calibration": search_ids,
                    "final_calibration": region[score_windows:]},
        "verdict": {k: getattr(Verdict.of(report), k) for k in ("prefix_ids", "prefix_tokens", "sink_positions")},
        "naive_objective": naive, "chosen_objective": best["objective"], "budget_met": best["objective"] <= budget,
        "ablation": ablation, "candidates": search.candidates, "recipe": recipe.resolved(),
        "seconds": time.perf_counter() - start,
    }
    return recipe, trace


def _profile(loaded: LoadedModel, windows: torch.Tensor) -> dict[str, Any]:
    """One profile of the search windows serves every prefix candidate (as the prefix step would profile)."""

    sample = TokenStream(ids=windows.reshape(-1), text_sha256="calibration windows", source={"kind": "calibration"})
    return profile(loaded, sample, ctx=windows.shape[1], windows=windows.shape[0], bos="never", progress=False,
                   probe=False)


def _steps(search: _Search) -> list[dict[str, Any]]:
    """The best candidate's steps with the exceptions and clipping the search applied to it in place."""
    best = search.best
    steps = list(best["steps"])
    if best["exceptions"]:
        steps.append({"exceptions": {"layers": list(best["exceptions"])}})
    if best["clip"]:
        steps.append({"clip": search.base.clip.model_dump(mode="json")})
    return steps


def _rotate(search: _Search, budget: float, ablation: list[dict[str, Any]]) -> None:
    """Rotation in front of the chosen prefix (PrefixQuant's order; rotation is exact in floating point, so the
    prefix candidates chosen on the fp model stand), kept if it pays. It does not pay on Gemma 3: folding its
    norm gains (up to 161 against a median of 3.5 to 12) into the rotated readers' weights leaves their per-channel
    scales to the largest gains, and int8 weights alone then cost 1.66 nats of KL (0.003 unrotated)."""
    before = search.best["objective"]
    if _budget_met("rotate", before, budget, ablation):
        return
    search.calibrated("rotate", [{"rotate": {}}, *search.best["steps"]])
    ablation.append(_ablation("rotate", before, search.best["objective"]))


def _gptq(search: _Search, budget: float, ablation: list[dict[str, Any]]) -> None:
    """The chosen recipe again with GPTQ weights in place of round-to-nearest, kept if it pays. Last, because
    each GPTQ candidate costs as much as the rest of the int4 search."""
    before = search.best["objective"]
    if _budget_met("gptq", before, budget, ablation):
        return
    search.calibrated("gptq", _steps(search), scheme=search.base.with_gptq())
    ablation.append(_ablation("gptq", before, search.best["objective"]))


def _smooth(search: _Search, ablation: list[dict[str, Any]]) -> None:
    """Smoothing at the grid's first alpha, kept if it pays; the rest of the grid waits for the exceptions.
    Rotation and smoothing answer the same outlier channels, and where rotation was kept smoothing after it lost
    in every search (z -4.5 to -11.2: SmolLM2 and Qwen2.5 on both texts, SmolLM2 at w4a8kv8), at the cost of
    the search's dearest candidate (rotation again, then a fresh smoothing measurement: 21 s of SmolLM2's 87 s,
    121 s of Qwen2.5's 373 s), so it is not tried there."""
    before = search.best["objective"]
    if search.kept("rotate") is not None:
        ablation.append(_skipped("smooth", before, "rotation kept"))
        return
    search.calibrated("smooth", [*search.best["steps"], {"smooth": {"alpha": search.base.alphas[0]}}])
    ablation.append(_ablation("smooth", before, search.best["objective"]))


def _alpha_walk(search: _Search, ablation: list[dict[str, Any]]) -> None:
    """Walk the alpha grid from its first value towards whichever neighbour improves, stopping when none does;
    every candidate carries the exceptions chosen so far (alpha and exceptions interact, module docstring). Only
    where smoothing at the first alpha was kept: in the four searches where it was not (Qwen2.5 on torch-docs,
    SmolLM2 at w4a8kv8 and w4a4kv4, SmolLM2's torch-docs after rotation), no other alpha was kept either."""
    before = search.best["objective"]
    if search.kept("smooth") is None:
        ablation.append(_skipped("alpha", before, "no smoothing kept"))
        return
    steps = [s for s in search.best["steps"] if "smooth" not in s]
    tail = [{"exceptions": {"layers": list(search.best["exceptions"])}}] if search.best["exceptions"] else []
    alphas = search.base.alphas
    tried = {alphas[0]: before}  # the best so far stands for the first alpha

    def attempt(alpha: float) -> float:
        search.calibrated("alpha", [*steps, {"smooth": {"alpha": alpha}}, *tail])
        tried[alpha] = search.candidates[-1].get("objective", math.inf)  # a refused candidate has none
        return tried[alpha]

    for direction in (sorted(a for a in alphas if a > alphas[0]), sorted((a for a in alphas if a < alphas[0]),
                                                                           reverse=True)):
        last = tried[alphas[0]]
        for alpha in direction:
            if attempt(alpha) >= last:
                break
            last = tried[alpha]
        if min(tried, key=tried.get) != alphas[0]:
            break
    ablation.append(_ablation("alpha", before, search.best["objective"]))


def _layer_alpha(search: _Search, ablation: list[dict[str, Any]]) -> None:
    """Each group's alpha chosen by the smooth step on the group's own output error, in place of the walk's one
    alpha, kept if it pays; the kept recipe names the chosen alphas, so applying it does not search again."""
    before = search.best["objective"]
    smooth = search.kept("smooth")
    if smooth is None:
        ablation.append(_skipped("layer_alpha", before, "no smoothing kept"))
        return
    steps = [{"smooth": {"alpha": smooth["alpha"], "layer_grid": list(search.base.layer_alphas)}} if "smooth" in s
             else s for s in search.best["steps"]]
    if search.best["exceptions"]:
        steps.append({"exceptions": {"layers": list(search.best["exceptions"])}})
    if search.calibrated("layer_alpha", steps):
        alphas = next(s["alphas"] for s in search.model.record["steps"] if s["step"] == "smooth")
        search.best["steps"] = [{"smooth": {"alpha": smooth["alpha"], "layers": alphas}} if "smooth" in s else s
                                for s in steps]
    ablation.append(_ablation("layer_alpha", before, search.best["objective"]))


def _exceptions(search: _Search, budget: float, max_exceptions: int, ablation: list[dict[str, Any]]) -> None:
    """The smallest top-k of the exceptions step's ranking that meets `budget`. The largest k allowed is scored
    first: if even it misses the budget (SmolLM2 at 0.005), it is the choice, without the doubling's five more
    forwards. Released layers get their activation scheme back afterwards."""
    before = search.best["objective"]
    if _budget_met("exceptions", before, budget, ablation):
        return
    if search.refused("exceptions", {}, [*_steps(search), {"exceptions": {"top": 1}}]):
        ablation.append(_skipped("exceptions", before, "the target cannot run it"))
        return
    layers = _quantized_layers(search.model)
    ranking = _exception_ranking(search.model, layers, search.calibration, search.objective.context)
    limit = min(int(MAX_SHARE * len(layers)), max_exceptions, len(ranking))
    scored: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}

    def score(k: int) -> float:
        if k not in scored:
            start = time.perf_counter()
            specs = {n: layers[n].activations for n in ranking[:k]}
            for name in specs:
                layers[name].activations = None
            try:
                measured = search.objective.measure(search.model.model, search.model.prefix)
                scored[k] = search.record("exceptions", {"count": k}, measured, start), measured[1]
            finally:
                for name, spec in specs.items():
                    layers[name].activations = spec
        return scored[k][0]["objective"]

    count = None
    if limit:
        count = limit if score(limit) > budget else _counts(limit, lambda k: score(k) <= budget)
    if count is not None and search.beats(scored[count][0]):
        search.promote({**search.best, "objective": scored[count][0]["objective"], "exceptions": ranking[:count]},
                       scored[count][1])
        for name in ranking[:count]:
            layers[name].activations = None
    ablation.append(_ablation("exceptions", before, search.best["objective"]))


def _clip(search: _Search, budget: float, ablation: list[dict[str, Any]]) -> None:
    """Clipping on the calibrated best candidate; its scales are restored when clipping does not pay."""
    before, quantized, start = search.best["objective"], search.model, time.perf_counter()
    if _budget_met("clip", before, budget, ablation):
        return
    if search.refused("clip", {}, [*_steps(search), {"clip": search.base.clip.model_dump(mode="json")}]):
        ablation.append(_skipped("clip", before, "the target cannot run it"))
        return
    layers = _quantized_layers(quantized)
    saved = {n: (m.act_scale, m.act_zero_point) for n, m in layers.items()}
    keep = quantized.record["keep"]
    session = Session(loaded=quantized.base, scheme=quantized.recipe.scheme,
                      calibration=search.calibration,
                      prefix=quantized.prefix, keep=KeepPolicy(tuple(keep["positions"]), tuple(keep["token_ids"])),
                      quantized=dict(layers), progress=False)
    Clip(search.base.clip).apply(session)
    measured = search.objective.measure(quantized.model, quantized.prefix)
    entry = search.record("clip", {"clip": search.base.clip.model_dump(mode="json")}, measured, start)
    if search.beats(entry):
        search.promote({**search.best, "objective": entry["objective"], "clip": True}, measured[1])
    else:
        for name, (scale, zero_point) in saved.items():
            layers[name].act_scale, layers[name].act_zero_point = scale, zero_point
    ablation.append(_ablation("clip", before, search.best["objective"]))


def write_auto_recipe(recipe: Recipe, trace: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """The recipe as a normal YAML file (`load_recipe` reads it) and the trace beside it as `<stem>.trace.json`,
    both atomically: applying the file reproduces the result without searching again."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise SinkquantError(f"auto recipe path {path} must end in .yaml or .yml (the trace goes beside it)")
    trace_path = path.with_name(f"{path.stem}.trace.json")
    atomic_write_text(path, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    atomic_write_json(trace_path, trace)
    return path, trace_path
