"""A recipe step is a component, in the spirit of llm-compressor's modifiers and torchao's config + handler:
a typed config, a stage, declared needs, conflicts and order rules checked when the recipe is parsed (the step's
spec, torch-free: specs.py), and a lifecycle the engine runs in the recipe's order (the step, a subclass of its
spec):

    check(scheme, steps, index)  parse time, before any model work: refuse what cannot work, naming the step
    apply(session)               do the work on the session's model; return what was done (the step's record)
    prepare_restore(session, r)  on loading an artifact, before its tensors: rebuild structure the step changed
    restore(session, record)     on loading an artifact, redo what the saved tensors alone do not hold

Adding a step is one `@register`ed subclass of Step (with its rules in a spec when recipes must be checked
before torch is imported); nothing else in the engine changes."""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from sinkquant.errors import SinkquantError

if TYPE_CHECKING:
    from sinkquant.quant.scheme import Scheme
    from sinkquant.steps.session import Session


class Stage(enum.IntEnum):
    """Where a step runs relative to the scheme's quantization (weights swapped, static scales calibrated)."""

    TRANSFORM = 0  # before: changes the model or what it is fed (prefix, rotate, smooth, keep_sink)
    REFINE = 1  # after: adjusts calibrated quantizers (exceptions, clip)


class StepConfig(BaseModel):
    """Base of every step's typed arguments: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# What a step may need from the scheme; each maps to the check that tells whether the scheme provides it.
NEEDS: dict[str, tuple[str, Any]] = {
    "weights": ("scheme.weights", lambda s: s.weights is not None),
    "activations": ("scheme.activations", lambda s: s.activations is not None),
    "static-activations": ("scheme.activations.mode: static",
                           lambda s: s.activations is not None and s.activations.mode == "static"),
    "kv": ("scheme.kv", lambda s: s.kv is not None),
}


class StepSpec:
    """What a recipe may say about one step, checked before any model work: its config, stage and rules.
    `invalidated_by`: steps that change what this one computes (`computes`) on the model, so they must come first."""

    name: ClassVar[str]
    Config: ClassVar[type[StepConfig]]
    stage: ClassVar[Stage]
    repeatable: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    computes: ClassVar[str] = ""
    invalidated_by: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StepConfig) -> None:
        self.config = config

    def check(self, scheme: Scheme, steps: Sequence[StepSpec], index: int) -> None:
        """Parse-time checks; the default enforces `needs` and `conflicts`. Raise SinkquantError with a message
        that says what would be valid (the parser prefixes the file and the step's index)."""
        for need in self.needs:
            what, present = NEEDS[need]
            if not present(scheme):
                raise SinkquantError(f"{self.name} needs {what}")
        for other in steps:
            if other.name in self.conflicts:
                raise SinkquantError(f"{self.name} conflicts with {other.name}; use one of them")

    def resolved(self) -> dict[str, Any]:
        """This step as a recipe entry, every default filled in."""
        return {self.name: self.config.model_dump(mode="json")}


class Step(StepSpec, ABC):
    """One recipe step. Subclasses set the class attributes (or inherit them from their spec) and implement
    `apply`."""

    @abstractmethod
    def apply(self, session: Session) -> dict[str, Any]:
        """Do the step's work on `session.model`; the returned dict is saved as this step's record."""

    def prepare_restore(self, session: Session, record: dict[str, Any]) -> None:
        """Before the saved tensors are loaded: rebuild modules the step added or replaced (default: nothing)."""
        return None

    def restore(self, session: Session, record: dict[str, Any]) -> None:
        """Redo, on a freshly built model, what the saved tensors do not hold (default: nothing)."""
        return None

SPECS: dict[str, type[StepSpec]] = {}  # the built-in steps' rules (specs.py), known before torch is imported
STEPS: dict[str, type[Step]] = {}  # the steps that do the work: the built-in ones by the same names, and any other


def spec(cls: type[StepSpec]) -> type[StepSpec]:
    """Class decorator: the rules of a step that recipes may name, known before its module (and torch) loads."""
    if cls.name in SPECS and SPECS[cls.name] is not cls:
        raise ValueError(f"step name {cls.name!r} is specified twice")
    SPECS[cls.name] = cls
    return cls


def register(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step available to recipes under `cls.name`; a step with a spec subclasses it."""
    if cls.name in STEPS and STEPS[cls.name] is not cls:
        raise ValueError(f"step name {cls.name!r} is registered twice")
    known = SPECS.get(cls.name)
    if known is not None and not issubclass(cls, known):
        raise ValueError(f"step {cls.name!r} must subclass its spec {known.__name__}")
    STEPS[cls.name] = cls
    return cls


def known_steps() -> dict[str, type[StepSpec]]:
    """Every step a recipe may name: the specs, and steps registered without one (their module imported)."""
    return {**SPECS, **{name: cls for name, cls in STEPS.items() if name not in SPECS}}
