"""Peer libraries that quantize a model by their own rules, on CPU, each with a save / reload that
round-trips: bitsandbytes (LLM.int8, nf4, fp4) via transformers' BitsAndBytesConfig, optimum-quanto (int8/int4
weights, int8 static activations with its own Calibration) and torchao (int8 weight-only, int8 dynamic
activations). One class per library, one registered instance per variant: what differs between variants is
data, never a branch on the name. lm_head is always left in full precision so a tied embedding stays tied.
Every variant saves safetensors and JSON (no pickle), and a saved folder lists the sha256 of each of its files.

The registry is importable without torch (the recipe parser reads the names): each library loads when used."""

from __future__ import annotations

import copy
import json
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sinkquant.errors import SinkquantError
from sinkquant.io import (
    atomic_dir,
    atomic_write_json,
    check_listed,
    file_digests,
    folder_files,
    read_manifest,
    verify_digests,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig, PreTrainedModel

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
        import torch
        from transformers import BitsAndBytesConfig

        if self.quant_type is None:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.int8_threshold,
                                      llm_int8_skip_modules=SKIP_MODULES)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIP_MODULES)

    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        import torch
        from transformers import AutoModelForCausalLM

        with tempfile.TemporaryDirectory(prefix="sinkquant-bnb-") as tmp:
            model.save_pretrained(tmp)
            quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=self.config(),
                                                             dtype=torch.float32, device_map="cpu")
        return quantized.eval()

    def save(self, model: PreTrainedModel, folder: Path) -> None:
        model.save_pretrained(folder)

    def load(self, folder: Path) -> PreTrainedModel:
        import torch
        from transformers import AutoModelForCausalLM

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

        from sinkquant.models import model_device  # here: the registry is imported without torch

        quantized = copy.deepcopy(model).eval()
        activations = getattr(quanto, self.activations) if self.activations else None
        quanto.quantize(quantized, weights=getattr(quanto, self.weights), activations=activations,
                        exclude=SKIP_MODULES)
        if activations is not None:
            device = model_device(quantized)
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
        import torch
        from optimum.quanto import requantize
        from safetensors.torch import load_file

        from sinkquant.models import empty_model

        model = empty_model(folder)
        qmap = json.loads((folder / "quanto_qmap.json").read_text())
        requantize(model, load_file(folder / "model.safetensors"), qmap, device=torch.device("cpu"))
        for name in json.loads((folder / QUANTO_NO_OUTPUT).read_text()):
            model.get_submodule(name).disable_output_quantization()
        model.tie_weights()
        return model


def _not_lm_head(module: nn.Module, name: str) -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) and name.split(".")[-1] not in SKIP_MODULES


@dataclass(frozen=True)
class TorchaoPeer(Peer):
    """torchao's `quantize_` with one of its configs, on a deep copy; saved as safetensors through torchao's own
    flattening of its tensor subclasses (their attributes go into the file's JSON metadata)."""

    config_name: str = "Int8WeightOnlyConfig"

    def quantize(self, model: PreTrainedModel, calib_batches: Iterable[torch.Tensor] | None) -> PreTrainedModel:
        from torchao import quantization

        quantized = copy.deepcopy(model).eval()
        quantization.quantize_(quantized, getattr(quantization, self.config_name)(), filter_fn=_not_lm_head)
        return quantized

    def save(self, model: PreTrainedModel, folder: Path) -> None:
        from safetensors.torch import save_file
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        model.config.save_pretrained(folder)
        tied = model.config.tie_word_embeddings  # safetensors stores a shared tensor once: tie_weights restores it
        state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        tensors, metadata = flatten_tensor_state_dict(state)
        save_file(tensors, str(folder / "model.safetensors"), metadata=metadata)

    def load(self, folder: Path) -> PreTrainedModel:
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        from sinkquant.models import empty_model

        model = empty_model(folder)
        path = folder / "model.safetensors"
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        state, leftover = unflatten_tensor_state_dict(load_file(path), metadata)
        missing, unexpected = model.load_state_dict({**state, **leftover}, assign=True, strict=False)
        missing = [m for m in missing if not (model.config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}"
            raise SinkquantError(f"{path}: {what}; the weights do not belong to this model")
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


def quantize_backend(
    model: PreTrainedModel, backend: str, calib_batches: Iterable[torch.Tensor] | None = None,
) -> PreTrainedModel:
    """A quantized model built from `model` (left untouched) by the peer `backend`."""
    import torch

    chosen = peer(backend)
    if chosen.needs_calibration and calib_batches is None:
        raise SinkquantError(f"backend {backend!r} needs calib_batches for its static activation scales")
    with torch.no_grad():
        return chosen.quantize(model, calib_batches)


def save_backend(model: PreTrainedModel, backend: str, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the quantized model atomically in a format its peer library reloads."""
    chosen = peer(backend)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        chosen.save(model, tmp)
        atomic_write_json(tmp / MANIFEST, {"backend": backend,
                                           "files": file_digests(tmp, folder_files(tmp, MANIFEST))})
    return Path(folder)


def load_backend(folder: str | Path, verify: bool = True) -> PreTrainedModel:
    """Reload a folder written by save_backend; `verify` checks every file's sha256 first."""
    folder = Path(folder)
    manifest = read_manifest(folder, MANIFEST, "it was not written by sinkquant.quant.save_backend")
    check_listed(folder, manifest.get("files"), MANIFEST)
    if verify:
        verify_digests(folder, manifest.get("files"), str(folder))
    return peer(manifest.get("backend")).load(folder)
