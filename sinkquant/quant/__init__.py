"""Quantization primitives and the simulated backend: the integer weight type, observers, kept positions,
the simulated Linear and KV cache. Real backends live in sinkquant.backends. Names load on first use (PEP 562),
so the recipe parser reads `sinkquant.quant.scheme` without importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_NAMES: dict[str, str] = {
    "KeepState": "keep", "attach_keep_state": "keep", "QuantizedWeight": "qweight", "quantize_rtn": "qweight",
    "ActivationScheme": "scheme", "KeepPolicy": "scheme", "KVScheme": "scheme", "Scheme": "scheme",
    "WeightScheme": "scheme", "QuantLinear": "simulate", "calibrate": "simulate", "fake_quant_activation": "simulate",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'sinkquant.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sinkquant.quant.{_NAMES[name]}"), name)
    globals()[name] = value
    return value
