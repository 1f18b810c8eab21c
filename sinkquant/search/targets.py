"""Where a searched recipe will run (`--recipe auto --target`): which recipes that runtime executes, the backend the
chosen recipe gets, and the artifact written for it. The search tries only what its target can run, so the
result is that runtime's model, not a simulation of one.

    native              sinkquant's integer backend (int8 GEMMs, int8 KV behind the fp prefix): a sinkquant
                        artifact that `sinkquant.load` and every command run. The default: it runs every
                        candidate the W8A8 search tries, so the search is unchanged and only the artifact is real.
    compressed-tensors  vLLM's format (transformers + compressed-tensors load it): the export's refusals (no
                        per-token full precision outside the prefix, no quantized KV, Gemma's post-norm rotation).
    onnx                ONNX Runtime's QDQ int8 graph: the ONNX exporter's refusals.
    simulated           research: quantize-dequantize in floating point, any scheme, no runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sinkquant.errors import SinkquantError

if TYPE_CHECKING:  # the CLI checks --target before torch is imported
    from torch import nn

    from sinkquant.recipe import Recipe


def _native(recipe: Recipe, _model: nn.Module | None) -> list[str]:
    from sinkquant.backends.registry import native_refusal

    refusal = native_refusal(recipe.scheme)
    return [refusal] if refusal else []


def _compressed_tensors(recipe: Recipe, model: nn.Module | None) -> list[str]:
    from sinkquant.backends.export.compressed_tensors import compressed_tensors_refusals

    return compressed_tensors_refusals(recipe, model)


def _onnx(recipe: Recipe, _model: nn.Module | None) -> list[str]:
    from sinkquant.backends.export.onnx import onnx_refusals

    return onnx_refusals(recipe)


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # the backend the chosen recipe names
    export_format: str | None  # None: a sinkquant artifact; else `sinkquant.backends.export.export`'s format
    refusals: Callable[[Recipe, nn.Module | None], list[str]]  # what the runtime cannot run, by part


TARGETS: dict[str, Target] = {
    "native": Target("native", "native", None, _native),
    "compressed-tensors": Target("compressed-tensors", "native", "compressed-tensors", _compressed_tensors),
    "onnx": Target("onnx", "native", "onnx", _onnx),
    "simulated": Target("simulated", "simulated", None, lambda _recipe, _model: []),
}
DEFAULT_TARGET = "native"


def check_target(name: str, scheme: str) -> Target:
    """The target named `name`, refused in one line (before any model loads) where the name is not one or its
    runtime cannot run the base scheme `scheme` at all."""
    from sinkquant.recipe import parse_recipe
    from sinkquant.search.space import base_scheme

    if name not in TARGETS:
        raise SinkquantError(f"--target {name!r} is not valid; valid: {', '.join(TARGETS)} (default "
                             f"{DEFAULT_TARGET})")
    chosen = TARGETS[name]
    base = parse_recipe({"name": f"auto-{scheme}", "description": "base scheme", "scheme": base_scheme(scheme).scheme},
                        f"base scheme {scheme}")
    reasons = chosen.refusals(base, None)
    if reasons:
        raise SinkquantError(f"--scheme {scheme} cannot run on --target {name} ({'; '.join(reasons)}); use --scheme "
                             "w8a8-static, or --target simulated (research: a simulated model)")
    return chosen
