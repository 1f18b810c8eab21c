"""Peer libraries that quantize a model by their own rules, on CPU, each with a save / reload that
round-trips: bitsandbytes (LLM.int8, nf4, fp4) via transformers' BitsAndBytesConfig, optimum-quanto (int8/int4
weights, int8 static activations with its own Calibration) and torchao (int8 weight-only, int8 dynamic
activations). One class per library, one registered instance per variant: what differs between variants is
data, never a branch on the name. lm_head is always left in full precision so a tied embedding stays tied."""

from __future__ import annotations

import copy
import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from sinkquant.artifacts import atomic_dir, atomic_write_json, read_manifest
from sinkquant.errors import SinkquantError
from sinkquant.models import empty_model

SKIP_MODULES = ["lm_head"]
MANIFEST = "sinkquant_backend.json"
# quanto's Calibration(streamline=True) drops output quantization where the consumer cannot take int8
# (add, silu); that choice lives in removed hooks, not in the state dict, so it is saved beside it.
QUANTO_NO_OUTPUT = "quanto_no_output_quantization.json"


@dataclass(frozen=True)
class Peer(ABC):
    """One peer variant: quantize a model (left untouched), write the result into a folder, read it back."""

    name: str
    description: str

    @property
    def needs_calibration(self) -> bool:
        return False

    @abstractmethod
    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        ...

    @abstractmethod
    def save(self, model: PreTrainedModel, folder: Path) -> None:
        ...

    @abstractmethod
    def load(self, folder: Path) -> PreTrainedModel:
        ...


@dataclass(frozen=True)
class BitsAndBytesPeer(Peer):
    """bitsandbytes through transformers: the model is reloaded from a temporary safetensors copy with a
    BitsAndBytesConfig. 4-bit must be saved before any CPU forward pass (bitsandbytes issue 2078)."""

    quant_type: str | None = None  # None: LLM.int8; 'nf4' or 'fp4': 4-bit weights
    int8_threshold: float = 6.0  # LLM.int8's outlier threshold; 0 disables the fp16 outlier path

    def config(self) -> BitsAndBytesConfig:
        if self.quant_type is None:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.int8_threshold,
                                      llm_int8_skip_modules=SKIP_MODULES)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIP_MODULES)

    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        with tempfile.TemporaryDirectory(prefix="sinkquant-bnb-") as tmp:
            model.save_pretrained(tmp)
            quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=self.config(),
                                                             dtype=torch.float32, device_map="cpu")
        return quantized.eval()

    def save(self, model: PreTrainedModel, folder: Path) -> None:
        model.save_pretrained(folder)

    def load(self, folder: Path) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()


@dataclass(frozen=True)
class QuantoPeer(Peer):
    """optimum-quanto on a deep copy: weights int8 or int4, optionally int8 static activations calibrated by
    quanto's own Calibration."""

    weights: str = "qint8"
    activations: str | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None

    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        from optimum import quanto

        quantized = copy.deepcopy(model).eval()
        activations = getattr(quanto, self.activations) if self.activations else None
        quanto.quantize(quantized, weights=getattr(quanto, self.weights), activations=activations,
                        exclude=SKIP_MODULES)
        if activations is not None:
            device = next(quantized.parameters()).device
            with quanto.Calibration():
                for batch in calib_batches:
                    quantized(input_ids=(batch.unsqueeze(0) if batch.dim() == 1 else batch).to(device))
        quanto.freeze(quantized)
        return quantized

    def save(self, model: PreTrainedModel, folder: Path) -> None:
        from optimum.quanto import quantization_map
        from safetensors.torch import save_model

        model.config.save_pretrained(folder)
        save_model(model, str(folder / "model.safetensors"))
        atomic_write_json(folder / "quanto_qmap.json", quantization_map(model))
        no_output = [name for name, module in model.named_modules()
                     if "output" in getattr(module, "_quantize_hooks", {})
                     and module._quantize_hooks["output"].id not in module._forward_hooks]
        atomic_write_json(folder / QUANTO_NO_OUTPUT, no_output)

    def load(self, folder: Path) -> PreTrainedModel:
        from optimum.quanto import requantize
        from safetensors.torch import load_file

        model = empty_model(folder)
        qmap = json.loads((folder / "quanto_qmap.json").read_text())
        requantize(model, load_file(folder / "model.safetensors"), qmap, device=torch.device("cpu"))
        for name in json.loads((folder / QUANTO_NO_OUTPUT).read_text()):
            model.get_submodule(name).disable_output_quantization()
        model.tie_weights()
        return model


def _not_lm_head(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.split(".")[-1] not in SKIP_MODULES


@dataclass(frozen=True)
class TorchaoPeer(Peer):
    """torchao's `quantize_` with one of its configs, on a deep copy; saved as a weights-only state dict of
    torchao's tensor subclasses."""

    config_name: str = "Int8WeightOnlyConfig"

    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        from torchao import quantization

        quantized = copy.deepcopy(model).eval()
        quantization.quantize_(quantized, getattr(quantization, self.config_name)(), filter_fn=_not_lm_head)
        return quantized

    def save(self, model: PreTrainedModel, folder: Path) -> None:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "model.pt")

    def load(self, folder: Path) -> PreTrainedModel:
        model = empty_model(folder)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True), assign=True)
        model.tie_weights()
        return model


PEERS: dict[str, Peer] = {peer.name: peer for peer in (
    BitsAndBytesPeer("bnb-int8", "bitsandbytes LLM.int8 (outlier threshold 6.0; 0 disables the fp16 outlier path)"),
    BitsAndBytesPeer("bnb-nf4", "bitsandbytes 4-bit NormalFloat weights, fp32 compute", quant_type="nf4"),
    BitsAndBytesPeer("bnb-fp4", "bitsandbytes 4-bit float weights, fp32 compute", quant_type="fp4"),
    QuantoPeer("quanto-w8a16", "optimum-quanto int8 weights"),
    QuantoPeer("quanto-w4a16", "optimum-quanto int4 weights (group 64)", weights="qint4"),
    QuantoPeer("quanto-w8a8", "optimum-quanto int8 weights + int8 static per-tensor activations (quanto "
               "Calibration)", activations="qint8"),
    TorchaoPeer("torchao-int8wo", "torchao int8 weight-only (per row)"),
    TorchaoPeer("torchao-int8dyn", "torchao int8 dynamic per-token activations + int8 per-row weights",
                config_name="Int8DynamicActivationInt8WeightConfig"),
)}


def peer(name: str) -> Peer:
    if name not in PEERS:
        raise SinkquantError(f"backend={name!r} is not valid; valid: {', '.join(PEERS)}")
    return PEERS[name]


@torch.no_grad()
def quantize_backend(
    model: PreTrainedModel, backend: str, calib_batches: Iterable[torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A quantized model built from `model` (left untouched) by the peer `backend`."""
    chosen = peer(backend)
    if chosen.needs_calibration and calib_batches is None:
        raise SinkquantError(f"backend {backend!r} needs calib_batches for its static activation scales")
    return chosen.quantize(model, calib_batches)


def save_backend(model: PreTrainedModel, backend: str, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the quantized model atomically in a format its peer library reloads."""
    chosen = peer(backend)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        chosen.save(model, tmp)
        atomic_write_json(tmp / MANIFEST, {"backend": backend})
    return Path(folder)


def load_backend(folder: str | Path) -> PreTrainedModel:
    """Reload a folder written by save_backend."""
    folder = Path(folder)
    backend = read_manifest(folder, MANIFEST, "it was not written by sinkquant.quant.save_backend")["backend"]
    return peer(backend).load(folder)
