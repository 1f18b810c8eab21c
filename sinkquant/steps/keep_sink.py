"""Sink tokens keep full-precision activations and KV and stay out of calibration (IntactKV-style: their KV is
the one the unquantized activations give)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import KeepSinkConfig, KeepSinkSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

__all__ = ["KeepSink", "KeepSinkConfig"]


@register
class KeepSink(KeepSinkSpec, Step):
    def apply(self, session: Session) -> dict[str, Any]:
        session.keep = session.keep.merged(tuple(self.config.positions), tuple(self.config.token_ids))
        return {"positions": list(self.config.positions), "token_ids": list(self.config.token_ids)}
