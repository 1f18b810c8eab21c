"""QuaRot/SpinQuant-style rotation as a step: an orthogonal (Hadamard where one exists) rotation of the residual
stream fused into the weights, per-head V/O, an online Hadamard before down_proj and a Q/K rotation before KV
quantization (sinkquant.quant.rotation). Exact in floating point; it spreads the sink tokens' channel peaks over
all channels so that one per-tensor scale fits every token better. List it before `prefix` to choose the prefix
from the rotated model (PrefixQuant's order)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sinkquant.quant.attention import add_transform
from sinkquant.quant.rotation import QK_ATTRIBUTE, RotationRecord, restore_rotation, rotate, rotate_qk
from sinkquant.steps.base import Step, register
from sinkquant.steps.specs import RotateConfig, RotateSpec

if TYPE_CHECKING:
    from sinkquant.steps.session import Session

__all__ = ["Rotate", "RotateConfig"]


def _qk_transform(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    query, key = rotate_qk(module, query, key)
    return query, key, value


def _install_qk(session: Session) -> None:
    """Q/K rotation runs in sinkquant's attention before any KV quantizer installed later."""
    add_transform(session.model, session.loaded.adapter,
                  lambda index, attention: _qk_transform if hasattr(attention, QK_ATTRIBUTE) else None)


@register
class Rotate(RotateSpec, Step):
    def apply(self, session: Session) -> dict[str, Any]:
        cfg = self.config
        record = rotate(session.loaded, seed=cfg.seed, residual=cfg.residual, value_output=cfg.value_output,
                        down_proj=cfg.down_proj, qk=cfg.qk)
        if record.qk:
            _install_qk(session)
        return record.to_dict()

    def prepare_restore(self, session: Session, record: dict[str, Any]) -> None:
        fields = {k: v for k, v in record.items() if k not in ("step", "seconds")}
        restore_rotation(session.model, RotationRecord.from_dict(fields))
        if fields["qk"]:
            _install_qk(session)
