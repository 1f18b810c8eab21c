"""Recipe steps, one module each, registered by name in `STEPS` (see base.py for the lifecycle); their torch-free
rules, which the recipe parser checks first, are in specs.py (`SPECS`). Importing this package stays cheap: the
step modules (and torch) load on the first use of `STEPS`."""

from __future__ import annotations

import importlib
from typing import Any

from sinkquant.steps import specs  # noqa: F401  (the built-in steps' rules, registered in SPECS)
from sinkquant.steps.base import SPECS, Stage, Step, StepConfig, StepSpec, register, spec

MODULES = ("act", "clip", "exceptions", "keep_sink", "prefix", "rotate", "smooth")

__all__ = ["MODULES", "SPECS", "STEPS", "Stage", "Step", "StepConfig", "StepSpec", "register", "spec"]


def __getattr__(name: str) -> Any:
    if name != "STEPS":
        raise AttributeError(f"module 'sinkquant.steps' has no attribute {name!r}")
    for module in MODULES:  # registration
        importlib.import_module(f"sinkquant.steps.{module}")
    from sinkquant.steps.base import STEPS

    globals()["STEPS"] = STEPS
    return STEPS
