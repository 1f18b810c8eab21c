"""Real quantization backends that run on CPU, each through its own library API, with a save / reload that
round-trips: bitsandbytes (LLM.int8, nf4, fp4) via transformers' BitsAndBytesConfig, optimum-quanto
(int8/int4 weights, int8 static activations with its own Calibration) and torchao (int8 weight-only,
int8 dynamic activations). lm_head is always left in full precision so a tied embedding stays tied."""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from sinkquant.artifacts import atomic_dir, atomic_write_json, read_manifest
from sinkquant.errors import SinkquantError
from sinkquant.models import empty_model

BACKENDS: dict[str, str] = {
    "bnb-int8": "bitsandbytes LLM.int8 (outlier threshold 6.0; 0 disables the fp16 outlier path)",
    "bnb-nf4": "bitsandbytes 4-bit NormalFloat weights, fp32 compute",
    "bnb-fp4": "bitsandbytes 4-bit float weights, fp32 compute",
    "quanto-w8a16": "optimum-quanto int8 weights",
    "quanto-w4a16": "optimum-quanto int4 weights (group 64)",
    "quanto-w8a8": "optimum-quanto int8 weights + int8 static per-tensor activations (quanto Calibration)",
    "torchao-int8wo": "torchao int8 weight-only (per row)",
    "torchao-int8dyn": "torchao int8 dynamic per-token activations + int8 per-row weights",
}
SKIP_MODULES = ["lm_head"]
MANIFEST = "sinkquant_backend.json"
# quanto's Calibration(streamline=True) drops output quantization where the consumer cannot take int8
# (add, silu); that choice lives in removed hooks, not in the state dict, so it is saved beside it.
QUANTO_NO_OUTPUT = "quanto_no_output_quantization.json"


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise SinkquantError(f"backend={name!r} is not valid; valid: {', '.join(BACKENDS)}")


def _bnb_config(name: str, int8_threshold: float) -> BitsAndBytesConfig:
    if name == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=int8_threshold,
                                  llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name.removeprefix("bnb-"),
                              bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIP_MODULES)


def _not_lm_head(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.split(".")[-1] not in SKIP_MODULES


@torch.no_grad()
def quantize_backend(
    model: PreTrainedModel,
    backend: str,
    calib_batches: Iterable[torch.Tensor] | None = None,
    int8_threshold: float = 6.0,
) -> PreTrainedModel:
    """A quantized model built from `model` (left untouched: bitsandbytes reloads it from a temporary
    safetensors copy, quanto and torchao work on a deep copy). quanto-w8a8 needs `calib_batches`."""
    _check_backend(backend)
    if backend == "quanto-w8a8" and calib_batches is None:
        raise SinkquantError("backend 'quanto-w8a8' needs calib_batches for its static activation scales")
    if backend.startswith("bnb-"):
        with tempfile.TemporaryDirectory(prefix="sinkquant-bnb-") as tmp:
            model.save_pretrained(tmp)
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=_bnb_config(backend, int8_threshold), dtype=torch.float32, device_map="cpu"
            )
        return quantized.eval()
    quantized = copy.deepcopy(model).eval()
    if backend.startswith("quanto-"):
        from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

        weights = qint4 if backend == "quanto-w4a16" else qint8
        activations = qint8 if backend == "quanto-w8a8" else None
        quantize(quantized, weights=weights, activations=activations, exclude=SKIP_MODULES)
        if activations is not None:
            device = next(quantized.parameters()).device
            with Calibration():
                for batch in calib_batches:
                    quantized(input_ids=(batch.unsqueeze(0) if batch.dim() == 1 else batch).to(device))
        freeze(quantized)
        return quantized
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if backend == "torchao-int8wo" else Int8DynamicActivationInt8WeightConfig()
    quantize_(quantized, config, filter_fn=_not_lm_head)
    return quantized


def _quanto_without_output_quantization(model: nn.Module) -> list[str]:
    return [
        name for name, module in model.named_modules()
        if "output" in getattr(module, "_quantize_hooks", {})
        and module._quantize_hooks["output"].id not in module._forward_hooks
    ]


def save_backend(model: PreTrainedModel, backend: str, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the quantized model atomically in a format its backend reloads. bitsandbytes 4-bit must be saved
    before any CPU forward pass (bitsandbytes issue 2078 corrupts it afterwards)."""
    _check_backend(backend)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        if backend.startswith("bnb-"):
            model.save_pretrained(tmp)
        elif backend.startswith("quanto-"):
            from optimum.quanto import quantization_map
            from safetensors.torch import save_model

            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))
            atomic_write_json(tmp / "quanto_qmap.json", quantization_map(model))
            atomic_write_json(tmp / QUANTO_NO_OUTPUT, _quanto_without_output_quantization(model))
        else:
            model.config.save_pretrained(tmp)
            torch.save(model.state_dict(), tmp / "model.pt")
        atomic_write_json(tmp / MANIFEST, {"backend": backend})
    return Path(folder)


def load_backend(folder: str | Path) -> PreTrainedModel:
    """Reload a folder written by save_backend."""
    folder = Path(folder)
    backend = read_manifest(folder, MANIFEST, "it was not written by sinkquant.quant.save_backend")["backend"]
    _check_backend(backend)
    if backend.startswith("bnb-"):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    model = empty_model(folder)
    if backend.startswith("quanto-"):
        from optimum.quanto import requantize
        from safetensors.torch import load_file

        qmap = json.loads((folder / "quanto_qmap.json").read_text())
        state = load_file(folder / "model.safetensors")
        requantize(model, state, qmap, device=torch.device("cpu"))
        for name in json.loads((folder / QUANTO_NO_OUTPUT).read_text()):
            model.get_submodule(name).disable_output_quantization()
    else:
        state = torch.load(folder / "model.pt", weights_only=True)
        model.load_state_dict(state, assign=True)
    model.tie_weights()
    return model
