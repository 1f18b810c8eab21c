"""The quantization engine: a session of steps around the scheme's quantization (apply.py), the layer-by-layer
calibration pipeline (pipeline.py), the backend registry (backends.py), artifacts on disk (artifact.py) and the
auto-recipe search (search.py). Names load on first use: recipes import the backend registry, and the engine
imports recipes."""

from __future__ import annotations

import importlib
from typing import Any

_API = {"QuantizedModel": "sinkquant.engine.apply", "apply_recipe": "sinkquant.engine.apply",
        "load": "sinkquant.engine.artifact", "save": "sinkquant.engine.artifact"}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sinkquant.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
