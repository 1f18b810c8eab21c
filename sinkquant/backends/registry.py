"""The backends a recipe can name, in one registry: sinkquant's own (the engine runs the recipe's steps and
scheme: `simulated`, `native`) and peer libraries that quantize by their own rules (compared against, never mixed
with steps). What a backend does differently is a method of its object, so the engine, save/load and the
exporters call the same method on every backend and never ask which kind they hold.

The engine sits above this layer, so what a backend needs from it (run the recipe, write or read sinkquant's
own artifact files) comes in as a callable. The registry is torch-free (the recipe parser reads it before torch
loads): each backend imports its kernels or library inside the methods that use them.

Adding a backend: one subclass (of `Backend`, or of `SimulatedBackend` to run recipes and change what happens
after, like `NativeBackend`) with its name and description, and one entry in BACKENDS."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sinkquant.backends.peers import PEERS, load_backend, quantize_backend, save_backend
from sinkquant.quant.scheme import Scheme

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import Cache, PretrainedConfig

    from sinkquant.perplexity import Prefix
    from sinkquant.quant.keep import KeepState
    from sinkquant.quant.qweight import QuantizedWeight

Result = TypeVar("Result")  # what the engine makes of a quantized model (its QuantizedModel), opaque here


@dataclass(frozen=True)
class Backend(ABC):
    """What every backend answers; the defaults are those of a backend without kernels or a KV cache of its own."""

    name: str
    description: str

    def refuse(self, scheme: Scheme) -> str | None:
        """What of `scheme` this backend cannot run, named by field; decided at parse time, without torch."""
        return None

    def recipe_refusal(self, scheme: Scheme, has_steps: bool) -> str | None:
        """Why a recipe with `scheme` (and steps, if `has_steps`) cannot run on this backend, or None; parse time."""
        refusal = self.refuse(scheme)
        if refusal is None and scheme.empty:
            return "scheme quantizes nothing; set scheme.weights, scheme.activations or scheme.kv"
        return refusal

    def export_refusals(self) -> list[str]:
        """Why no export can write this backend's model (empty: the exporters decide by the recipe)."""
        return []

    def streaming_refusal(self) -> str | None:
        """Why a recipe on this backend cannot be quantized or loaded one decoder layer at a time, or None."""
        return None

    @abstractmethod
    def quantize(self, model: nn.Module, windows: torch.Tensor, run_recipe: Callable[[], Result],
                 wrap: Callable[[nn.Module], Result]) -> Result:
        """The quantized model: the engine's `run_recipe()` (steps and scheme, then `finalize`), or a model
        quantized some other way handed to `wrap`. `windows`: calibration token ids [windows, seq]."""

    @abstractmethod
    def save_model(self, model: nn.Module, folder: Path, save_recipe: Callable[[], list[str]]) -> list[str]:
        """Write the model's files into the artifact `folder` (the engine's `save_recipe()` writes sinkquant's
        integers and scales); returns the names written. The engine adds the tokenizer and the manifest."""

    @abstractmethod
    def load_model(self, folder: Path, load_recipe: Callable[[], Result], wrap: Callable[[nn.Module], Result]
                   ) -> Result:
        """The model of an artifact `save_model` wrote (its files already verified): `load_recipe()` rebuilds
        sinkquant's own, another format is read here and handed to `wrap`."""

    @abstractmethod
    def stored_bytes(self, measure: Callable[[], int]) -> int | None:
        """Bytes of the model's files in its artifact: the engine's `measure()` of sinkquant's own tensors, or None
        where another format stores them."""

    @property
    def simulated_kv(self) -> bool:
        """Whether the engine's simulated KV quantization serves scheme.kv (False: `kv_cache` does, for real)."""
        return True

    def kv_cache(self, config: PretrainedConfig, scheme: Scheme, keep: KeepState | None, prefix: Prefix | None
                 ) -> Cache | None:
        """The KV cache of this backend's own that a forward starts from, or None (the prefix's fp KV, if any)."""
        return None

    def finalize(self, model: nn.Module, scheme: Scheme) -> dict[str, Any]:
        """After the recipe's steps, and again on reload: swap in this backend's layers. Returns what it adds
        to the quantization record (nothing by default)."""
        return {}

    def stored_weight(self, module: nn.Module, leaf: str) -> QuantizedWeight | None:
        """The integer weight the state-dict entry `leaf` of `module` holds, which the artifact stores as
        `weight_int` (int4 packed: `weight_packed`); None for any other entry. The engine's own layers
        (QuantLinear) hold it as `weight_int`."""
        return module.qweight if leaf == "weight_int" else None


@dataclass(frozen=True)
class SimulatedBackend(Backend):
    """The engine quantizes and dequantizes in floating point: any scheme, for research."""

    def quantize(self, model: nn.Module, windows: torch.Tensor, run_recipe: Callable[[], Result],
                 wrap: Callable[[nn.Module], Result]) -> Result:
        return run_recipe()

    def save_model(self, model: nn.Module, folder: Path, save_recipe: Callable[[], list[str]]) -> list[str]:
        return save_recipe()

    def load_model(self, folder: Path, load_recipe: Callable[[], Result], wrap: Callable[[nn.Module], Result]
                   ) -> Result:
        return load_recipe()

    def stored_bytes(self, measure: Callable[[], int]) -> int | None:
        return measure()


def _converts_whole_model(name: str) -> str:
    return (f"backend {name!r} converts the whole model; stream its simulated twin (the artifact's tensors are "
            "the same) or quantize in memory")


def native_refusal(scheme: Scheme) -> str | None:
    """Schemes the native integer backend has no kernel or cache for, named by field (checked at parse time)."""
    weights, activations, kv = scheme.weights, scheme.activations, scheme.kv
    if weights is None:
        return "backend 'native' needs scheme.weights (it runs integer weights); use backend 'simulated'"
    if activations is not None and weights.granularity == "group":
        return ("scheme.weights.granularity='group' with scheme.activations has no integer kernel in backend "
                "'native'; valid: granularity 'tensor' or 'channel', or leave activations out (W*A16)")
    if kv is not None and (kv.granularity != "token" or kv.bits != 8):
        return (f"scheme.kv granularity={kv.granularity!r} bits={kv.bits} is not stored by backend 'native' "
                "(Int8KVCache); valid: granularity 'token', bits 8")
    return None


@dataclass(frozen=True)
class NativeBackend(SimulatedBackend):
    """The recipe runs as in `simulated`; then the quantized layers become integer kernels (NativeLinear, an
    int8 lm_head when the embeddings are stored int8) and scheme.kv is served by an Int8KVCache."""

    def refuse(self, scheme: Scheme) -> str | None:
        return native_refusal(scheme)

    def streaming_refusal(self) -> str | None:
        return _converts_whole_model(self.name)

    @property
    def simulated_kv(self) -> bool:
        return False

    def kv_cache(self, config: PretrainedConfig, scheme: Scheme, keep: KeepState | None, prefix: Prefix | None
                 ) -> Cache | None:
        if scheme.kv is None:
            return None
        from sinkquant.backends.kv_cache import Int8KVCache  # torch: imported when first used

        return Int8KVCache(config, scheme.kv, keep, prefix)

    def finalize(self, model: nn.Module, scheme: Scheme) -> dict[str, Any]:
        from sinkquant.backends.native import convert_to_native

        embeddings = scheme.embeddings
        converted = convert_to_native(model, int8_head=embeddings is not None and embeddings.dtype == "int8")
        return {self.name: {"converted_layers": len(converted)}}

    def stored_weight(self, module: nn.Module, leaf: str) -> QuantizedWeight | None:
        from sinkquant.backends.native import NativeLinear

        if leaf == "qweight" and isinstance(module, NativeLinear):
            return module.quantized_weight()
        return super().stored_weight(module, leaf)


@dataclass(frozen=True)
class PeerBackend(Backend):
    """A peer library quantizes, saves and reloads by its own rules (sinkquant.backends.peers); the artifact
    keeps its folder under `backend/`."""

    FOLDER: ClassVar[str] = "backend"

    def recipe_refusal(self, scheme: Scheme, has_steps: bool) -> str | None:
        if has_steps or scheme != Scheme():
            return f"backend {self.name!r} quantizes by its own rules: leave steps and scheme out"
        return None

    def export_refusals(self) -> list[str]:
        return [f"backend {self.name!r}: a peer library's quantization has no sinkquant integers to export "
                "(valid: 'simulated' or 'native')"]

    def streaming_refusal(self) -> str | None:
        return _converts_whole_model(self.name)

    def quantize(self, model: nn.Module, windows: torch.Tensor, run_recipe: Callable[[], Result],
                 wrap: Callable[[nn.Module], Result]) -> Result:
        return wrap(quantize_backend(model, self.name, calib_batches=list(windows[:, None])))

    def save_model(self, model: nn.Module, folder: Path, save_recipe: Callable[[], list[str]]) -> list[str]:
        save_backend(model, self.name, folder / self.FOLDER)
        return []

    def load_model(self, folder: Path, load_recipe: Callable[[], Result], wrap: Callable[[nn.Module], Result]
                   ) -> Result:
        return wrap(load_backend(folder / self.FOLDER, verify=False))  # the artifact's manifest covered its files

    def stored_bytes(self, measure: Callable[[], int]) -> int | None:
        return None


BACKENDS: dict[str, Backend] = {
    "simulated": SimulatedBackend("simulated", "quantize-dequantize in floating point: any scheme, for research"),
    "native": NativeBackend("native", "integer weights and CPU int8 kernels (sinkquant.backends.native), int8 KV "
                            "cache behind the fp prefix: the steps and scheme run as in 'simulated', then the "
                            "quantized layers are swapped"),
    **{name: PeerBackend(name, peer.description) for name, peer in PEERS.items()},
}
