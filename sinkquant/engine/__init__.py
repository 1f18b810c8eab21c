"""The quantization engine: a session of steps around the scheme's quantization (apply.py), the layer-by-layer
calibration pipeline (pipeline.py), artifacts on disk (artifact.py) and the streaming pipeline for models larger
than memory (stream.py). It runs recipes; backends (sinkquant.backends) say how the result executes, exporters
(sinkquant.backends.export) write it for a runtime, and the auto search (sinkquant.search) chooses the recipe."""

from sinkquant.engine.apply import QuantizedModel, apply_recipe
from sinkquant.engine.artifact import load, save

__all__ = ["QuantizedModel", "apply_recipe", "load", "save"]
