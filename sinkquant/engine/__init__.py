"""The quantization engine: a session of steps around the scheme's quantization (apply.py), the layer-by-layer
calibration pipeline (pipeline.py), the backend registry (backends.py) and artifacts on disk (artifact.py)."""

from sinkquant.engine.apply import QuantizedModel, apply_recipe
from sinkquant.engine.artifact import load, save

__all__ = ["QuantizedModel", "apply_recipe", "load", "save"]
