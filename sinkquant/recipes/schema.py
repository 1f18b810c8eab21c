"""Typed recipe files: YAML in the spirit of llm-compressor (a list of mitigation steps, then the scheme).

Validation happens before any model work; an unknown key, a wrong type or a bad value is reported with the
file, the field path and what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sinkquant.artifacts import read_structured
from sinkquant.errors import SinkquantError
from sinkquant.quant import ActivationSpec, KeepPolicy, KVSpec, QuantScheme, WeightSpec
from sinkquant.quant.backends import BACKENDS as REAL_BACKENDS

BACKENDS = ("simulated", *REAL_BACKENDS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsConfig(_Strict):
    bits: int = 8
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = None
    symmetric: bool = True


class ActivationsConfig(_Strict):
    bits: int = 8
    mode: Literal["static", "dynamic-tensor", "dynamic-token"] = "static"
    observer: Literal["absmax", "percentile", "mse"] = "absmax"
    percentile: float = 99.99
    symmetric: bool = True


class KVConfig(_Strict):
    bits: int = 8
    granularity: Literal["head", "token"] = "token"
    symmetric: bool = False


class SchemeConfig(_Strict):
    weights: WeightsConfig | None = None
    activations: ActivationsConfig | None = None
    kv: KVConfig | None = None
    exclude: list[str] = Field(default_factory=list)


class KeepSinkStep(_Strict):
    """Sink tokens keep full-precision activations and KV (IntactKV: their KV from the fp model)."""

    positions: list[int] = Field(default_factory=lambda: [0])
    token_ids: list[int] = Field(default_factory=list)


class ClipStep(_Strict):
    """Per-layer activation clipping ratio that minimises the layer's output error on calibration tokens
    (sinks left out)."""

    grid: int = Field(default=20, ge=2, le=200)
    min_ratio: float = Field(default=0.3, gt=0.0, lt=1.0)
    samples: int = Field(default=512, ge=16)


class PrefixStep(_Strict):
    """A fixed prefix whose KV is computed once in full precision, so quantized layers never see the peaks."""

    tokens: Literal["profile", "greedy"] | list[int | str] = "profile"
    max_tokens: int = Field(default=4, ge=1, le=32)
    bos: Literal["auto", "always", "never"] = "auto"


class SmoothStep(_Strict):
    """SmoothQuant migration s_j = max|X_j|^alpha / max|W_j|^(1-alpha) into the preceding norm."""

    alpha: float = Field(default=0.5, ge=0.0, le=1.0)


class ExceptionsStep(_Strict):
    """Per-layer exceptions: the `top` Linear inputs whose calibrated static range is widest keep
    full-precision activations (their weights stay quantized). On SmolLM2 these are a few down_proj inputs."""

    top: int = Field(default=8, ge=1)


class Step(_Strict):
    keep_sink: KeepSinkStep | None = None
    clip: ClipStep | None = None
    prefix: PrefixStep | None = None
    smooth: SmoothStep | None = None
    exceptions: ExceptionsStep | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        set_fields = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(set_fields) != 1:
            raise ValueError(f"each step names exactly one of {', '.join(type(self).model_fields)}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def args(self) -> BaseModel:
        return getattr(self, self.kind)


class CalibrationConfig(_Strict):
    windows: int = Field(default=8, ge=1)
    ctx: int | None = Field(default=None, ge=2, description="defaults to the evaluation ctx")


class Recipe(_Strict):
    name: str
    description: str
    backend: str = "simulated"
    steps: list[Step] = Field(default_factory=list)
    scheme: SchemeConfig = Field(default_factory=SchemeConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise ValueError(f"unknown backend {value!r}; valid: {', '.join(BACKENDS)}")
        return value

    @model_validator(mode="after")
    def _real_backends_take_no_steps(self) -> Recipe:
        if self.backend != "simulated" and (self.steps or self.scheme != SchemeConfig()):
            raise ValueError(f"backend {self.backend!r} quantizes by its own rules: leave steps and scheme empty")
        return self

    def step(self, kind: str) -> BaseModel | None:
        return next((s.args for s in self.steps if s.kind == kind), None)

    def quant_scheme(self, keep: KeepPolicy | None = None) -> QuantScheme:
        """The engine's scheme; its dataclasses add the semantic checks (e.g. group_size only with 'group')."""
        s = self.scheme
        try:
            return QuantScheme(
                weights=WeightSpec(**s.weights.model_dump()) if s.weights else None,
                activations=ActivationSpec(**s.activations.model_dump()) if s.activations else None,
                kv=KVSpec(**s.kv.model_dump()) if s.kv else None,
                exclude=tuple(s.exclude),
                keep=keep or KeepPolicy(),
            )
        except SinkquantError as exc:
            raise SinkquantError(f"scheme.{exc}") from exc

    def resolved(self) -> dict[str, Any]:
        """Every default filled in: what a saved artifact records."""
        return self.model_dump(mode="json")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that holds the field at `loc`, to list the keys that would be valid there."""
    cls: type[BaseModel] | None = Recipe
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


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            holder = _model_at(err["loc"][:-1])
            valid = ", ".join(holder.model_fields) if holder else "see recipes/README"
            parts.append(f"{path}: unknown key; valid keys here: {valid}")
            continue
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        parts.append(f"{path or '<top>'}: {err['msg']}{got_text}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise SinkquantError(f"{source}: a recipe must be a YAML mapping with name, description, steps, scheme")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise SinkquantError(_format_error(source, exc)) from None
    if recipe.backend == "simulated" and recipe.scheme.weights is None and recipe.scheme.activations is None \
            and recipe.scheme.kv is None:
        raise SinkquantError(f"{source}: scheme quantizes nothing; set scheme.weights, scheme.activations or scheme.kv")
    if recipe.backend == "simulated":
        try:
            recipe.quant_scheme()  # the engine's semantic checks, before any model work
        except SinkquantError as exc:
            raise SinkquantError(f"{source}: invalid recipe: {exc}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = read_structured(path, "recipe")
    try:
        return parse_recipe(data, str(path))
    except SinkquantError as exc:
        message = str(exc)
        raise SinkquantError(message if message.startswith(str(path)) else f"{path}: {message}") from None
