"""Quantization engine: simulated (quantize-dequantize) schemes with position-aware activation and KV
quantization, calibration observers, and real CPU backends (bitsandbytes, optimum-quanto, torchao)."""

from sinkquant.quant.backends import BACKENDS, load_backend, quantize_backend, save_backend
from sinkquant.quant.keep import KeepState
from sinkquant.quant.kv import fake_quant_kv
from sinkquant.quant.observers import AbsmaxObserver, MSEObserver, Observer, PercentileObserver, make_observer
from sinkquant.quant.primitives import (
    fake_quant_dynamic,
    fake_quant_range,
    qrange,
    quantize_dequantize,
    quantize_weight,
    scale_zero_point,
)
from sinkquant.quant.scheme import ActivationSpec, KeepPolicy, KVSpec, QuantScheme, WeightSpec
from sinkquant.quant.simulate import QuantLinear, QuantSummary, calibrate, fake_quant_activation, quantize_model

__all__ = [
    "BACKENDS", "AbsmaxObserver", "ActivationSpec", "KVSpec", "KeepPolicy", "KeepState", "MSEObserver", "Observer",
    "PercentileObserver", "QuantLinear", "QuantScheme", "QuantSummary", "WeightSpec", "calibrate",
    "fake_quant_activation", "fake_quant_dynamic", "fake_quant_kv", "fake_quant_range", "load_backend",
    "make_observer", "qrange", "quantize_backend", "quantize_dequantize", "quantize_model", "quantize_weight",
    "save_backend", "scale_zero_point",
]
