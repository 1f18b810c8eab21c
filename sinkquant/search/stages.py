"""One class per search stage, in the order the loop runs them (`STAGES`). A stage says whether it applies at all
(`applies`: no ablation entry where it does not), whether it is skipped and why (`skipped`), and tries its
candidates, typed steps (sinkquant.steps.specs), against the best so far (`run`); each is kept only beyond the
objective's noise. docs/auto-search.md says why the stages come in this order."""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from sinkquant.engine.apply import QuantizedModel
from sinkquant.models import LoadedModel
from sinkquant.profiling.verdict import Verdict
from sinkquant.quant.simulate import QuantLinear
from sinkquant.search.objective import forward
from sinkquant.search.state import Search, quantized_layers
from sinkquant.steps.base import StepSpec
from sinkquant.steps.clip import Clip as ClipStep
from sinkquant.steps.exceptions import MAX_SHARE, release
from sinkquant.steps.prefix import profile_candidates, with_bos
from sinkquant.steps.specs import (
    ClipSpec,
    ExceptionsConfig,
    ExceptionsSpec,
    KeepSinkConfig,
    KeepSinkSpec,
    PrefixConfig,
    PrefixSpec,
    RotateConfig,
    RotateSpec,
    SmoothConfig,
    SmoothSpec,
)


class SearchStage(ABC):
    name: ClassVar[str]
    while_unmet: ClassVar[bool] = False  # tried only while the budget is unmet

    def applies(self, search: Search) -> bool:
        """False: the stage has no place in this search and the ablation does not list it."""
        return True

    def skipped(self, search: Search) -> str | None:
        """Why the stage is not tried (the ablation lists it with the reason), None where it is."""
        if self.while_unmet and search.chosen.objective <= search.budget:
            return "budget already met"
        return None

    @abstractmethod
    def run(self, search: Search) -> None:
        """Try the stage's candidates; `search` keeps whichever beats the best beyond the noise."""


def prefix_step(loaded: LoadedModel, ids: list[int]) -> PrefixSpec:
    """An explicit prefix that the prefix step honours as given (BOS only where the list starts with it). Its
    fp-loss check is off: the objective already counts what a prefix does to the fp model."""
    bos = "auto" if ids[:1] == [loaded.bos_id] else "never"
    return PrefixSpec(PrefixConfig(tokens=list(ids), max_tokens=len(ids), bos=bos, check=False))


def prefix_candidates(loaded: LoadedModel, report: dict[str, Any] | None, windows: torch.Tensor, max_prefix: int
                      ) -> list[list[int]]:
    """The prefix step's own selection (BOS where the model is trained with it, then PrefixQuant's content
    tokens, with their fallbacks) cut at lengths 1..max_prefix: the verdict's prefix alone may be empty."""
    content, _ = profile_candidates(loaded, windows, report)
    ranked = with_bos(loaded, content, "auto")
    return [ranked[:k] for k in range(1, min(max_prefix, len(ranked)) + 1)]


class Prefix(SearchStage):
    """Prefixes lengthened one token at a time while each pays."""

    name = "prefix"

    def run(self, search: Search) -> None:
        for ids in prefix_candidates(search.loaded, search.report, search.calibration, search.base.max_prefix):
            if not search.calibrated(self.name, [prefix_step(search.loaded, ids)]) and len(ids) > 1:
                break


class KeepSink(SearchStage):
    """Where no prefix pays: the verdict's sink positions kept in full precision instead."""

    name = "keep_sink"

    def applies(self, search: Search) -> bool:
        return not search.chosen.steps and bool(Verdict.of(search.report).sink_positions)

    def run(self, search: Search) -> None:
        sinks = Verdict.of(search.report).sink_positions
        search.calibrated(self.name, [KeepSinkSpec(KeepSinkConfig(positions=sinks))])


class Rotate(SearchStage):
    """Rotation in front of the chosen prefix (PrefixQuant's order): rotation is exact in floating point, so the
    prefix chosen on the fp model stands."""

    name = "rotate"
    while_unmet = True

    def run(self, search: Search) -> None:
        search.calibrated(self.name, [RotateSpec(RotateConfig()), *search.chosen.steps])


class Smooth(SearchStage):
    """Smoothing at the grid's first alpha; the rest of the grid waits for the exceptions. Rotation answers the
    same outlier channels, and smoothing after a kept rotation has never paid, at the cost of the dearest
    candidate, so it is not tried there."""

    name = "smooth"

    def skipped(self, search: Search) -> str | None:
        return "rotation kept" if search.kept("rotate") is not None else None

    def run(self, search: Search) -> None:
        alpha = search.base.alphas[0]
        search.calibrated(self.name, [*search.chosen.steps, SmoothSpec(SmoothConfig(alpha=alpha))])


@torch.no_grad()
def exception_ranking(quantized: QuantizedModel, layers: dict[str, QuantLinear], windows: torch.Tensor,
                      context: list[int]) -> list[str]:
    """Static-activation layers, largest relative output error ||W (Q(x) - x)||^2 / ||W x||^2 first, measured on
    the search's calibration windows with the inputs each layer sees in the quantized model: the exceptions
    step's own `top` order (widest range) misses where the error sits."""
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
            forward(quantized.model, window, context, quantized.prefix, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(static, key=lambda n: (-error[n] / max(signal[n], 1e-30), n))


def smallest_count(limit: int, meets: Callable[[int], bool]) -> int:
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


class Exceptions(SearchStage):
    """The smallest top-k of the error ranking that meets the budget, at most `max_exceptions`: the largest k
    allowed is scored first, and is the choice if even it misses. Each count is scored on the best's model with
    those inputs in floating point (no recalibration); the chosen ones are released as the step releases them."""

    name = "exceptions"
    while_unmet = True

    def skipped(self, search: Search) -> str | None:
        reason = super().skipped(search)
        if reason is None and search.refused(self.name, {}, [*search.recipe_steps(),
                                                             ExceptionsSpec(ExceptionsConfig(top=1))]):
            return "the target cannot run it"
        return reason

    def run(self, search: Search) -> None:
        layers = quantized_layers(search.model)
        ranking = exception_ranking(search.model, layers, search.calibration, search.objective.context)
        limit = min(int(MAX_SHARE * len(layers)), search.max_exceptions, len(ranking))
        scored: dict[int, tuple[dict[str, Any], torch.Tensor]] = {}

        def score(k: int) -> float:
            if k not in scored:
                start = time.perf_counter()
                with contextlib.ExitStack() as floats:
                    for name in ranking[:k]:
                        floats.enter_context(layers[name].float_inputs())
                    measured = search.objective.measure(search.model.model, search.model.prefix)
                    scored[k] = search.record(self.name, {"count": k}, measured, start), measured[1]
            return scored[k][0]["objective"]

        if not limit:
            return
        count = limit if score(limit) > search.budget else smallest_count(limit, lambda k: score(k) <= search.budget)
        logged, tokens = scored[count]
        if search.beats(logged):
            chosen = search.chosen
            chosen.objective, chosen.tokens, chosen.exceptions = logged["objective"], tokens, ranking[:count]
            release(search.session(), chosen.exceptions)


class AlphaWalk(SearchStage):
    """The alpha grid walked from its first value towards whichever neighbour improves, stopping when none does;
    every candidate carries the exceptions chosen so far, since alpha and exceptions interact. Only where
    smoothing at the first alpha was kept."""

    name = "alpha"

    def skipped(self, search: Search) -> str | None:
        return "no smoothing kept" if search.kept("smooth") is None else None

    @staticmethod
    def candidates(search: Search) -> dict[float, list[StepSpec]]:
        """Per alpha of the grid: the best's steps with that smoothing alpha and the exceptions chosen so far."""
        steps = [s for s in search.chosen.steps if s.name != "smooth"]
        exceptions = search.chosen.exceptions
        tail = [ExceptionsSpec(ExceptionsConfig(layers=list(exceptions)))] if exceptions else []
        return {alpha: [*steps, SmoothSpec(SmoothConfig(alpha=alpha)), *tail] for alpha in search.base.alphas}

    def run(self, search: Search) -> None:
        alphas, candidates = search.base.alphas, self.candidates(search)
        tried = {alphas[0]: search.chosen.objective}  # the best so far stands for the first alpha

        def attempt(alpha: float) -> float:
            search.calibrated(self.name, candidates[alpha])
            tried[alpha] = search.candidates[-1].get("objective", math.inf)  # a refused candidate has none
            return tried[alpha]

        for direction in (sorted(a for a in alphas if a > alphas[0]),
                          sorted((a for a in alphas if a < alphas[0]), reverse=True)):
            last = tried[alphas[0]]
            for alpha in direction:
                if attempt(alpha) >= last:
                    break
                last = tried[alpha]
            if min(tried, key=tried.get) != alphas[0]:
                break


class LayerAlpha(SearchStage):
    """Each smoothing group's alpha chosen by the smooth step on the group's own output error in place of the
    walk's one alpha; the kept recipe names the chosen alphas, so applying it does not search again."""

    name = "layer_alpha"

    def skipped(self, search: Search) -> str | None:
        return "no smoothing kept" if search.kept("smooth") is None else None

    def run(self, search: Search) -> None:
        alpha = search.kept("smooth").alpha
        grid = SmoothSpec(SmoothConfig(alpha=alpha, layer_grid=search.base.layer_alphas))
        steps = [grid if s.name == "smooth" else s for s in search.recipe_steps()]
        if search.calibrated(self.name, steps):
            chosen = SmoothSpec(SmoothConfig(alpha=alpha, layers=search.model.step_record("smooth")["alphas"]))
            search.chosen.steps = [chosen if s.name == "smooth" else s for s in search.chosen.steps]


class Clip(SearchStage):
    """Clipping run as the clip step on the best's calibrated model; its scales are restored where it does not
    pay."""

    name = "clip"
    while_unmet = True

    def skipped(self, search: Search) -> str | None:
        reason = super().skipped(search)
        if reason is None and search.refused(self.name, {}, [*search.recipe_steps(), ClipSpec(search.base.clip)]):
            return "the target cannot run it"
        return reason

    def run(self, search: Search) -> None:
        quantized, start = search.model, time.perf_counter()
        session = search.session()
        saved = {n: (m.act_scale, m.act_zero_point) for n, m in session.quantized.items()}
        ClipStep(search.base.clip).apply(session)
        measured = search.objective.measure(quantized.model, quantized.prefix)
        logged = search.record(self.name, {"clip": search.base.clip.model_dump(mode="json")}, measured, start)
        if search.beats(logged):
            search.chosen.objective, search.chosen.tokens, search.chosen.clip = logged["objective"], measured[1], True
        else:
            for name, (scale, zero_point) in saved.items():
                session.quantized[name].act_scale, session.quantized[name].act_zero_point = scale, zero_point


class Gptq(SearchStage):
    """The chosen recipe again with GPTQ weights in place of round-to-nearest, at int4 only; last, because each
    GPTQ candidate costs as much as the rest of the int4 search."""

    name = "gptq"
    while_unmet = True

    def applies(self, search: Search) -> bool:
        return search.base.gptq

    def run(self, search: Search) -> None:
        search.calibrated(self.name, search.recipe_steps(), scheme=search.base.with_gptq())


# The search, in order. Adding a stage is a SearchStage subclass above and its place in this list.
STAGES: list[SearchStage] = [Prefix(), KeepSink(), Rotate(), Smooth(), Exceptions(), AlphaWalk(), LayerAlpha(),
                             Clip(), Gptq()]
