"""Sink tokens keep full-precision activations and KV and stay out of calibration (IntactKV-style: their KV is
the one the unquantized activations give)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, NonNegativeInt

from sinkquant.errors import SinkquantError
from sinkquant.quant.scheme import Scheme
from sinkquant.steps.base import Stage, Step, StepConfig, register

if TYPE_CHECKING:
    from sinkquant.engine.session import Session


class KeepSinkConfig(StepConfig):
    positions: list[NonNegativeInt] = Field(default_factory=lambda: [0])
    token_ids: list[NonNegativeInt] = Field(default_factory=list)


@register
class KeepSink(Step):
    name = "keep_sink"
    Config = KeepSinkConfig
    stage = Stage.TRANSFORM

    def check(self, scheme: Scheme, steps: Sequence[Step], index: int) -> None:
        super().check(scheme, steps, index)
        if scheme.activations is None and scheme.kv is None:
            raise SinkquantError("keep_sink needs scheme.activations or scheme.kv (weights alone keep nothing)")

    def apply(self, session: Session) -> dict[str, Any]:
        session.keep = session.keep.merged(tuple(self.config.positions), tuple(self.config.token_ids))
        return {"positions": list(self.config.positions), "token_ids": list(self.config.token_ids)}
