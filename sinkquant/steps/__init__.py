"""Recipe steps, one module each, registered by name in `STEPS` (see base.py for the lifecycle)."""

from sinkquant.steps import clip, exceptions, keep_sink, prefix, smooth  # noqa: F401  (registration)
from sinkquant.steps.base import STEPS, Stage, Step, StepConfig, register

__all__ = ["STEPS", "Stage", "Step", "StepConfig", "register"]
