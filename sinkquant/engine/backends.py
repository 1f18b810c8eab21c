"""The backends a recipe can name, in one registry: sinkquant's own (the recipe's steps and scheme run through
the engine) and peer libraries that quantize by their own rules (compared against, never mixed with steps)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    runs_recipes: bool  # True: sinkquant's engine applies the steps and scheme; False: a peer library's own rules


_PEERS = {
    "bnb-int8": "bitsandbytes LLM.int8 (outlier threshold 6.0; 0 disables the fp16 outlier path)",
    "bnb-nf4": "bitsandbytes 4-bit NormalFloat weights, fp32 compute",
    "bnb-fp4": "bitsandbytes 4-bit float weights, fp32 compute",
    "quanto-w8a16": "optimum-quanto int8 weights",
    "quanto-w4a16": "optimum-quanto int4 weights (group 64)",
    "quanto-w8a8": "optimum-quanto int8 weights + int8 static per-tensor activations (quanto Calibration)",
    "torchao-int8wo": "torchao int8 weight-only (per row)",
    "torchao-int8dyn": "torchao int8 dynamic per-token activations + int8 per-row weights",
}

BACKENDS: dict[str, Backend] = {
    "simulated": Backend("simulated", "quantize-dequantize in floating point: any scheme, for research", True),
    **{name: Backend(name, text, False) for name, text in _PEERS.items()},
}
