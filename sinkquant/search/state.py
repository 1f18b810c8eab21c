"""The search's state: every candidate tried (the trace), the best so far, and its quantized model, which the
stages that change a model in place (exceptions, clipping) work on."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sinkquant.data import TokenStream, plan_windows
from sinkquant.engine.apply import QuantizedModel, apply_recipe
from sinkquant.models import LoadedModel
from sinkquant.quant.keep import keep_state
from sinkquant.quant.simulate import QuantLinear
from sinkquant.recipe import Recipe, parse_recipe
from sinkquant.search.objective import NOISE_Z, Objective, improvement_z
from sinkquant.search.space import DEFAULT_BUDGET, DEFAULT_MAX_EXCEPTIONS, BaseScheme
from sinkquant.steps.base import StepConfig, StepSpec, known_steps
from sinkquant.steps.session import Session
from sinkquant.steps.specs import ClipSpec, ExceptionsConfig, ExceptionsSpec

Steps = Sequence[StepSpec | Mapping[str, Any]]  # typed steps, or recipe entries ({name: args}) as a trace has them


def entry(step: StepSpec) -> dict[str, Any]:
    """A step as a recipe entry with only the arguments the search gave (what the trace records)."""
    return {step.name: step.config.model_dump(mode="json", exclude_unset=True)}


def typed(step: StepSpec | Mapping[str, Any]) -> StepSpec:
    """A recipe entry as its step's typed spec; a typed step as it is."""
    if isinstance(step, StepSpec):
        return step
    ((name, args),) = step.items()
    cls = known_steps()[name]
    return cls(cls.Config(**args))


def make_recipe(name: str, description: str, steps: Sequence[StepSpec], scheme: BaseScheme, windows: int, ctx: int,
                backend: str = "simulated") -> Recipe:
    return parse_recipe({"name": name, "description": description, "backend": backend,
                         "steps": [entry(s) for s in steps], "scheme": scheme.scheme,
                         "calibration": {"windows": windows, "ctx": ctx}}, f"auto recipe {name}")


def quantized_layers(quantized: QuantizedModel) -> dict[str, QuantLinear]:
    return {n: m for n, m in quantized.model.named_modules() if isinstance(m, QuantLinear)}


@dataclass
class Best:
    """The best candidate so far: its recipe steps and scheme, plus what the in-place stages did to its model
    (released `exceptions`, `clip`ped scales), and its per-token KL, which later candidates are paired against."""

    steps: list[StepSpec]
    scheme: BaseScheme
    objective: float
    tokens: torch.Tensor
    exceptions: list[str] = field(default_factory=list)
    clip: bool = False

    def kept(self, name: str) -> StepConfig | None:
        """The config of step `name` in the best, None where it has none: later stages depend on what was kept."""
        return next((s.config for s in self.steps if s.name == name), None)


class Search:
    """Candidates, their objective values and seconds, and the best so far. `budget` and `max_exceptions` bound
    the stages that release or refine (sinkquant.search.stages); `refuse` names what the target cannot run."""

    def __init__(self, loaded: LoadedModel, stream: TokenStream, base: BaseScheme, ctx: int, search_windows: int,
                 objective: Objective, report: dict[str, Any] | None, progress: bool,
                 refuse: Callable[[Recipe], list[str]] | None = None, budget: float = DEFAULT_BUDGET,
                 max_exceptions: int = DEFAULT_MAX_EXCEPTIONS) -> None:
        self.loaded, self.stream, self.base, self.ctx = loaded, stream, base, ctx
        self.refuse = refuse or (lambda _recipe: [])  # what the target runtime cannot run: never tried
        self.search_windows, self.objective, self.report = search_windows, objective, report
        self.budget, self.max_exceptions = budget, max_exceptions
        self.calibration = stream.windows(ctx, list(plan_windows(stream, ctx, 1, search_windows).calib_windows))
        self.candidates: list[dict[str, Any]] = []
        self.bar = tqdm(desc="auto recipe", unit="candidate", disable=not progress, leave=False)
        self.chosen: Best | None = None
        self.model: QuantizedModel | None = None  # the best's quantized model
        self.memo: dict[Any, Any] = {}  # every candidate is a copy of the untouched loaded model

    @property
    def best(self) -> dict[str, Any]:
        """The best so far with its steps as recipe entries, as the trace writes candidates."""
        chosen = self.chosen
        return {"steps": [entry(s) for s in chosen.steps], "scheme": chosen.scheme.scheme,
                "objective": chosen.objective, "exceptions": list(chosen.exceptions), "clip": chosen.clip}

    def record(self, stage: str, what: dict[str, Any], measured: tuple[dict[str, float], torch.Tensor],
               start: float) -> dict[str, Any]:
        """Log a candidate with `z`, its improvement over the best so far in standard errors (None for the
        first); `beats` says whether that is beyond the noise."""
        score, tokens = measured
        z = None if self.chosen is None else improvement_z(tokens, self.chosen.tokens)
        logged = {"stage": stage, **what, **score, "z": z, "seconds": time.perf_counter() - start}
        self.candidates.append(logged)
        self.bar.update(1)
        self.bar.set_postfix(stage=stage, kl=f"{score['objective']:.4f}")
        return logged

    @staticmethod
    def beats(logged: dict[str, Any]) -> bool:
        return logged["z"] is None or logged["z"] > NOISE_Z

    def kept(self, name: str) -> StepConfig | None:
        return self.chosen.kept(name)

    def recipe_steps(self) -> list[StepSpec]:
        """The best's steps with the exceptions and clipping the search applied to its model in place."""
        chosen = self.chosen
        steps = list(chosen.steps)
        if chosen.exceptions:
            steps.append(ExceptionsSpec(ExceptionsConfig(layers=list(chosen.exceptions))))
        if chosen.clip:
            steps.append(ClipSpec(self.base.clip))
        return steps

    def refused(self, stage: str, what: dict[str, Any], steps: Sequence[StepSpec],
                scheme: BaseScheme | None = None) -> bool:
        """A candidate the target cannot run is logged with the reasons (`refused`) and never quantized."""
        recipe = make_recipe(f"search-{len(self.candidates)}", "auto recipe candidate", steps, scheme or self.base,
                             self.search_windows, self.ctx)
        reasons = self.refuse(recipe)
        if reasons:
            self.candidates.append({"stage": stage, **what, "refused": reasons})
        return bool(reasons)

    def calibrated(self, stage: str, steps: Steps, scheme: BaseScheme | None = None) -> bool:
        """Quantize and calibrate a candidate on the search windows (the base scheme unless `scheme` is given);
        keep it if it beats the best so far beyond the objective's noise."""
        start = time.perf_counter()
        steps = [typed(s) for s in steps]
        what: dict[str, Any] = {"steps": [entry(s) for s in steps]}
        if scheme is not None:
            what["scheme"] = scheme.scheme
        if self.refused(stage, what, steps, scheme):
            return False
        recipe = make_recipe(f"search-{len(self.candidates)}", "auto recipe candidate", steps, scheme or self.base,
                             self.search_windows, self.ctx)
        quantized = apply_recipe(self.loaded, recipe, self.stream, self.ctx, profile_report=self.report, copy=True,
                                 memo=self.memo)
        measured = self.objective.measure(quantized.model, quantized.prefix)
        logged = self.record(stage, what, measured, start)
        if not self.beats(logged):
            return False
        self.chosen = Best(steps, scheme or self.base, logged["objective"], measured[1])
        self.model = quantized
        return True

    def session(self) -> Session:
        """The best's quantized model as a step sees it, for the stages that run a step on it in place."""
        quantized = self.model
        return Session(loaded=quantized.base, scheme=quantized.recipe.scheme, calibration=self.calibration,
                       prefix=quantized.prefix, keep=keep_state(quantized.model).policy,
                       quantized=dict(quantized_layers(quantized)), progress=False)
