"""Exports that serving runtimes load, one module per format: compressed-tensors for vLLM (`compressed_tensors`,
its rotations as `transforms`) and ONNX Runtime (`onnx` writes the graph, `onnx_runtime` runs it). Exporters sit
above the engine: they write what it made. A new format is one module with a writer and a refusals function,
registered in EXPORTERS (its name in sinkquant.backends.FORMATS, which the CLI checks before torch loads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sinkquant.backends import FORMATS
from sinkquant.backends.export import compressed_tensors, onnx
from sinkquant.errors import SinkquantError

if TYPE_CHECKING:
    from sinkquant.engine.apply import QuantizedModel
    from sinkquant.recipe import Recipe


@dataclass(frozen=True)
class Exporter:
    write: Callable[..., Path]  # (quantized, out, overwrite) -> the folder written
    refusals: Callable[[Recipe], list[str]]  # what of a recipe the format cannot express, before anything is made


EXPORTERS: dict[str, Exporter] = {
    "compressed-tensors": Exporter(compressed_tensors.export_quantized, compressed_tensors.compressed_tensors_refusals),
    "onnx": Exporter(onnx.export_onnx, onnx.onnx_refusals),
}
assert tuple(EXPORTERS) == FORMATS, "sinkquant.backends.FORMATS names the exporters, torch-free"


def export(quantized: QuantizedModel, out: str | os.PathLike, format: str = "compressed-tensors",
           overwrite: bool = False) -> Path:
    """Write an engine-made model for a serving runtime, with its fp prefix KV; the model itself is untouched."""
    if format not in EXPORTERS:
        raise SinkquantError(f"format={format!r} is not valid; valid: {', '.join(FORMATS)}")
    return EXPORTERS[format].write(quantized, out, overwrite=overwrite)


def refusals(format: str, recipe: Recipe | dict[str, Any]) -> list[str]:
    """Why `format` cannot express `recipe` (empty: it can)."""
    return EXPORTERS[format].refusals(recipe)
