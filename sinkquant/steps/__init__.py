"""Recipe steps, one module each, registered by name in `STEPS` (see base.py for the lifecycle). The base names
come first: step modules reach the recipe parser, which reads STEPS while this package is still importing."""

from sinkquant.steps.base import STEPS, Stage, Step, StepConfig, register  # isort: skip
from sinkquant.steps import act, clip, exceptions, keep_sink, prefix, rotate, smooth  # noqa: F401, E402  (registration)

__all__ = ["STEPS", "Stage", "Step", "StepConfig", "register"]
