"""Quantization primitives and the simulated backend: the integer weight type, observers, kept positions,
the simulated Linear and KV cache. Real backends live in sinkquant.backends."""

from sinkquant.quant.keep import KeepState, attach_keep_state
from sinkquant.quant.qweight import QuantizedWeight, quantize_rtn
from sinkquant.quant.scheme import ActivationScheme, KeepPolicy, KVScheme, Scheme, WeightScheme
from sinkquant.quant.simulate import QuantLinear, calibrate, fake_quant_activation

__all__ = [
    "ActivationScheme", "KVScheme", "KeepPolicy", "KeepState", "QuantLinear", "QuantizedWeight", "Scheme",
    "WeightScheme", "attach_keep_state", "calibrate", "fake_quant_activation", "quantize_rtn",
]
