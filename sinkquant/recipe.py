"""Typed recipe files: YAML in the spirit of llm-compressor, a list of steps (run in the listed order) and the
quantization scheme they prepare for.

Validation happens before any model work: an unknown key, a wrong type, a bad value, a step that needs what
the scheme lacks, a duplicate or a step out of stage order is one error naming the file, the field path (or the
step's index and name) and what would be valid. `check_recipe` does all of it without torch (the steps' specs);
`parse_recipe` then builds the steps that do the work."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sinkquant.backends.registry import BACKENDS
from sinkquant.errors import SinkquantError
from sinkquant.io import read_structured
from sinkquant.quant.scheme import Scheme
from sinkquant.steps import Stage, Step, StepSpec
from sinkquant.steps.base import known_steps


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    windows: int = Field(default=8, ge=1, le=1 << 16)
    ctx: int | None = Field(default=None, ge=2, le=1 << 20, description="defaults to the evaluation ctx")
    pipeline: Literal["sequential", "whole"] = Field(
        default="sequential", description="sequential: one decoder layer at a time (weights plus one layer's "
                                          "activations in memory); whole: full-model forwards")


class RecipeFile(BaseModel):
    """The file as written; `steps` entries are checked against the step registry afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    backend: str = "simulated"
    steps: list[dict[str, Any]] = Field(default_factory=list)
    scheme: Scheme = Field(default_factory=Scheme)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class Recipe(BaseModel):
    """A parsed recipe: the steps are components (sinkquant.steps), in execution order."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str
    backend: str
    steps: tuple[Step, ...]
    scheme: Scheme
    calibration: CalibrationConfig

    def resolved(self) -> dict[str, Any]:
        """The recipe as run: only the steps given, every default filled in (what an artifact records)."""
        return {
            "name": self.name, "description": self.description, "backend": self.backend,
            "steps": [s.resolved() for s in self.steps],
            "scheme": self.scheme.model_dump(mode="json", exclude_none=True),
            "calibration": self.calibration.model_dump(mode="json", exclude_none=True),
        }

    def with_calib_windows(self, windows: int | None) -> Recipe:
        """The recipe with `windows` in place of its `calibration.windows` (itself when None): what
        --calib-windows means in every command."""
        if windows is None:
            return self
        return self.model_copy(update={"calibration": self.calibration.model_copy(update={"windows": windows})})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.resolved() == other.resolved()

    def __hash__(self) -> int:
        return hash(repr(self.resolved()))


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the field at `loc`, to list the keys that would be valid there."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or cls is None:
            continue
        field_info = cls.model_fields.get(part)
        if field_info is None:
            return None
        cls = _first_model(field_info.annotation)
    return cls


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _first_model(a)) is not None), None)


def format_validation(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line for every problem pydantic found: the field path, what was wrong, what is valid."""
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        if err["type"] == "extra_forbidden":
            holder = _model_at(root, err["loc"][:-1])
            valid = ", ".join(holder.model_fields) if holder else "see the README's recipe section"
            parts.append(f"{path}: unknown key; valid keys here: {valid}")
            continue
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{path or '<top>'}: {message}{got_text}")
    return "; ".join(parts)


def _check_steps(entries: list[dict[str, Any]], scheme: Scheme) -> tuple[StepSpec, ...]:
    """The steps as their specs (no torch), every parse-time rule checked."""
    steps: list[StepSpec] = []
    known = known_steps()
    for index, entry in enumerate(entries):
        where = f"steps[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SinkquantError(f"{where}: each step is a mapping with one key, the step's name; valid names: "
                                 f"{', '.join(sorted(known))}")
        (name, args), = entry.items()
        cls = known.get(name)
        if cls is None:
            raise SinkquantError(f"{where}: unknown step {name!r}; valid steps: {', '.join(sorted(known))}")
        try:
            config = cls.Config.model_validate(args or {})
        except ValidationError as exc:
            raise SinkquantError(format_validation(exc, cls.Config, f"{where}.{name}")) from None
        steps.append(cls(config))
    for index, step in enumerate(steps):
        where = f"steps[{index}] ({step.name})"
        if not step.repeatable and any(s.name == step.name for s in steps[:index]):
            raise SinkquantError(f"{where}: duplicate step; {step.name} may appear once")
        later_refine = next((i for i, s in enumerate(steps[:index]) if s.stage == Stage.REFINE), None)
        if step.stage == Stage.TRANSFORM and later_refine is not None:
            raise SinkquantError(
                f"{where}: changes the model before quantization, so it cannot follow steps[{later_refine}] "
                f"({steps[later_refine].name}), which adjusts calibrated quantizers; move it earlier"
            )
        earlier = next((i for i, s in enumerate(steps[:index]) if step.name in s.invalidated_by), None)
        if earlier is not None:
            raise SinkquantError(
                f"{where}: changes what steps[{earlier}] ({steps[earlier].name}) computed ({steps[earlier].computes}) "
                f"on the model, so it cannot follow it; list {step.name} before {steps[earlier].name}"
            )
        try:
            step.check(scheme, [s for s in steps if s is not step], index)
        except SinkquantError as exc:
            raise SinkquantError(f"{where}: {exc}") from None
    return tuple(steps)


def check_recipe(data: Any, source: str = "<recipe>") -> tuple[RecipeFile, tuple[StepSpec, ...]]:
    """Every parse-time rule of a recipe mapping (as read from YAML/JSON), without torch; errors start with
    `source`. Returns the file and its steps' specs."""
    if not isinstance(data, dict):
        raise SinkquantError(f"{source}: a recipe must be a YAML mapping with name, description, steps, scheme")
    try:
        raw = RecipeFile.model_validate(data)
    except ValidationError as exc:
        raise SinkquantError(f"{source}: invalid recipe: {format_validation(exc, RecipeFile)}") from None
    backend = BACKENDS.get(raw.backend)
    if backend is None:
        raise SinkquantError(f"{source}: invalid recipe: backend: unknown backend {raw.backend!r}; valid: "
                             f"{', '.join(BACKENDS)}")
    refusal = backend.recipe_refusal(raw.scheme, has_steps=bool(raw.steps))
    if refusal is not None:
        raise SinkquantError(f"{source}: invalid recipe: {refusal}")
    if raw.scheme.weights is not None and raw.scheme.weights.gptq is not None and \
            raw.calibration.pipeline != "sequential":
        raise SinkquantError(f"{source}: invalid recipe: scheme.weights.gptq collects Hessians layer by layer; "
                             "set calibration.pipeline: sequential")
    try:
        return raw, _check_steps(raw.steps, raw.scheme)
    except SinkquantError as exc:
        raise SinkquantError(f"{source}: invalid recipe: {exc}") from None


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping (as read from YAML/JSON; errors start with `source`) and build its steps."""
    raw, specs = check_recipe(data, source)
    steps: tuple[Step, ...] = ()
    if specs:  # the step modules, and torch with them, load only for a recipe that has steps
        from sinkquant.steps import STEPS

        steps = tuple(STEPS[s.name](s.config) for s in specs)
    return Recipe(name=raw.name, description=raw.description, backend=raw.backend, steps=steps, scheme=raw.scheme,
                  calibration=raw.calibration)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(read_structured(path, "recipe"), str(path))


def check_recipe_file(path: str | Path) -> RecipeFile:
    """`load_recipe`'s refusals without torch (for the command line, before any heavy import)."""
    path = Path(path)
    return check_recipe(read_structured(path, "recipe"), str(path))[0]
