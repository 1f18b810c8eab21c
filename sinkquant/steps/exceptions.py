"""Per-layer exceptions: the Linear inputs whose calibrated static range is widest (or a named list) keep
full-precision activations; their weights stay quantized. On SmolLM2 these are a few down_proj inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sinkquant.errors import SinkquantError
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import ExceptionsConfig, ExceptionsSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

__all__ = ["MAX_SHARE", "Exceptions", "ExceptionsConfig", "release"]

# Beyond a quarter of the layers a W8A8 scheme has become a W8A16 one in all but name: use a weight-only scheme.
MAX_SHARE = 0.25


@register
class Exceptions(ExceptionsSpec, Step):
    def apply(self, session: Session) -> dict[str, Any]:
        static = {n: m for n, m in session.quantized.items() if m.activations is not None}
        limit = int(MAX_SHARE * len(session.quantized))
        if self.config.layers is not None:
            unknown = [n for n in self.config.layers if n not in static]
            if unknown:
                raise SinkquantError(f"exceptions.layers: {unknown[0]!r} is not a quantized layer with static "
                                     f"activations; names look like {next(iter(static))}")
            names = list(dict.fromkeys(self.config.layers))
        else:
            names = sorted(static, key=lambda n: (-float(static[n].act_scale), n))[: self.config.top]
        if len(names) > limit:
            raise SinkquantError(
                f"exceptions: {len(names)} layers would keep full-precision inputs, more than {int(MAX_SHARE * 100)}% "
                f"of the {len(session.quantized)} quantized layers (at most {limit}); use a weight-only scheme instead"
            )
        release(session, names)
        return {"layers": names}

    def restore(self, session: Session, record: dict[str, Any]) -> None:
        release(session, record["layers"])


def release(session: Session, names: list[str]) -> None:
    for name in names:
        layer = session.quantized.get(name)
        if layer is None:
            raise SinkquantError(f"exceptions: {name!r} is not a quantized layer of this model")
        layer.activations = None
