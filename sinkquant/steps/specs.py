"""What a recipe may say about each built-in step, without torch: its typed config (every number with a range)
and its parse-time rules (stage, needs, order). The recipe parser checks a file against these before any heavy
import, so a bad recipe is refused in well under a second; each step's module subclasses its spec with the work.

Order rules (`invalidated_by`): a step that computes something on the model refuses to come before a step that
changes what it computed; the parser names both. The pairs, and why:
  prefix <- rotate     the prefix KV is computed by the model; the rotation changes Q/K and V
  smooth <- rotate     smoothing scales are per residual channel; the rotation mixes the channels
  smooth <- prefix     its statistics come from calibration windows that a later prefix changes (sinks move there)
  smooth <- act        its statistics come from attention outputs that a later act recalibrates
  act    <- prefix     the heads are chosen on windows without the prefix the model then runs with
  clip   <- exceptions the clip ranges are fitted to inputs of quantized upstream layers that exceptions release"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, PositiveInt, model_validator

from sinkquant.errors import SinkquantError
from sinkquant.profiling.thresholds import HIDDEN_SINK_THRESHOLD
from sinkquant.steps.base import Stage, StepConfig, StepSpec, spec

if TYPE_CHECKING:
    from sinkquant.quant.scheme import Scheme

# Bounds that keep every integer inside what torch and the tokenizers take (a position or id of 1e21 overflows
# int64 deep in a forward pass): far beyond any model's context or vocabulary, so no real recipe meets them.
MAX_POSITION = 1 << 20
MAX_TOKEN_ID = 1 << 24
MAX_SEED = (1 << 32) - 1
Position = Annotated[int, Field(ge=0, le=MAX_POSITION)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Alpha = Annotated[float, Field(ge=0.0, le=1.0)]

BETA = 0.4  # ACT's default
MIN_QUERIES = 32  # as the profile's hidden sinks: a key seen by a handful of queries has a large mean by construction


class KeepSinkConfig(StepConfig):
    positions: list[Position] = Field(default_factory=lambda: [0])
    token_ids: list[TokenId] = Field(default_factory=list)


@spec
class KeepSinkSpec(StepSpec):
    name = "keep_sink"
    Config = KeepSinkConfig
    stage = Stage.TRANSFORM

    def check(self, scheme: Scheme, steps: Sequence[StepSpec], index: int) -> None:
        super().check(scheme, steps, index)
        if scheme.activations is None and scheme.kv is None:
            raise SinkquantError("keep_sink needs scheme.activations or scheme.kv (weights alone keep nothing)")


class PrefixConfig(StepConfig):
    tokens: Literal["profile", "greedy"] | list[TokenId | str] = "profile"
    max_tokens: int = Field(default=4, ge=1, le=32)
    bos: Literal["auto", "always", "never"] = "auto"
    # Measure an explicit list's effect on the fp calibration loss (recorded, never dropped): four fp forwards.
    # Automatic choices are always checked, since the check is what decides them.
    check: bool = True

    @model_validator(mode="after")
    def _explicit_unchecked(self) -> PrefixConfig:
        if not self.check and isinstance(self.tokens, str):
            raise ValueError(f"check: false needs an explicit tokens list; tokens {self.tokens!r} are chosen by the "
                             "check itself")
        return self


@spec
class PrefixSpec(StepSpec):
    name = "prefix"
    Config = PrefixConfig
    stage = Stage.TRANSFORM
    computes = "its KV"
    invalidated_by = ("rotate",)


class RotateConfig(StepConfig):
    seed: Seed = 0
    residual: bool = True
    value_output: bool = True
    down_proj: bool = True
    qk: bool = True


@spec
class RotateSpec(StepSpec):
    name = "rotate"
    Config = RotateConfig
    stage = Stage.TRANSFORM


class SmoothConfig(StepConfig):
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with `alpha` for every group but those `layers` names (by the
    group's source, as the record's `largest_scale` lists them) or, given `layer_grid`, those the step chooses."""

    alpha: Alpha = 0.5
    layers: dict[str, Alpha] = Field(default_factory=dict)
    layer_grid: tuple[Alpha, ...] = Field(default=(), max_length=100)


@spec
class SmoothSpec(StepSpec):
    name = "smooth"
    Config = SmoothConfig
    stage = Stage.TRANSFORM
    needs = ("activations",)
    computes = "its per-channel scales from calibration activations"
    invalidated_by = ("rotate", "prefix", "act")

    def resolved(self) -> dict[str, Any]:
        """One-alpha recipes resolve as they always did (their artifacts and baselines still match)."""
        config = self.config.model_dump(mode="json")
        return {self.name: {k: v for k, v in config.items() if k == "alpha" or v}}


class ActConfig(StepConfig):
    beta: float = Field(BETA, gt=0.0, le=1.0, description="scale of the attention on hidden sinks (ACT: 0.4)")
    threshold: float = Field(HIDDEN_SINK_THRESHOLD, gt=0.0, lt=1.0,
                             description="column mean above which a key beyond token 0 is a hidden sink")
    min_queries: int = Field(MIN_QUERIES, ge=1, le=MAX_POSITION,
                             description="queries that must have seen a key before it counts")
    head_share: float = Field(0.5, gt=0.0, le=1.0,
                              description="a head is calibrated when it has a hidden sink in this share of "
                                          "the calibration windows")


@spec
class ActSpec(StepSpec):
    name = "act"
    Config = ActConfig
    stage = Stage.TRANSFORM
    computes = "its heads from calibration attention"
    invalidated_by = ("prefix",)


class ExceptionsConfig(StepConfig):
    top: PositiveInt | None = Field(default=None, le=MAX_POSITION)
    layers: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> ExceptionsConfig:
        if (self.top is None) == (self.layers is None):
            raise ValueError("give exactly one of top (a count) or layers (module names)")
        return self


@spec
class ExceptionsSpec(StepSpec):
    name = "exceptions"
    Config = ExceptionsConfig
    stage = Stage.REFINE
    needs = ("static-activations",)


class ClipConfig(StepConfig):
    grid: int = Field(default=20, ge=2, le=200)
    min_ratio: float = Field(default=0.3, gt=0.0, lt=1.0)
    samples: int = Field(default=512, ge=16, le=1 << 16)
    seed: Seed = 0


@spec
class ClipSpec(StepSpec):
    name = "clip"
    Config = ClipConfig
    stage = Stage.REFINE
    needs = ("static-activations",)
    computes = "its ranges from the inputs of the quantized layers"
    invalidated_by = ("exceptions",)
