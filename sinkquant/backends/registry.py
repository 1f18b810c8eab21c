"""The backends a recipe can name, in one registry: sinkquant's own (the recipe's steps and scheme run through
the engine) and peer libraries that quantize by their own rules (compared against, never mixed with steps).
What a backend does differently is a field of its entry, so callers never branch on its name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sinkquant.backends.peers import PEERS, Peer
from sinkquant.quant.scheme import Scheme

if TYPE_CHECKING:  # the registry itself is torch-free: the recipe parser reads it before torch is imported
    from torch import nn
    from transformers import Cache


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    peer: Peer | None = None  # a peer library quantizes by its own rules; None: the engine runs the recipe
    refuse: Callable[[Scheme], str | None] | None = None  # what the backend cannot run, decided by the recipe alone
    finalize: Callable[[nn.Module, Scheme], list[str]] | None = None  # after quantizing and on reload: kernels
    # Serves scheme.kv through a KV cache of its own (config, kv scheme, keep state, prefix) instead of the
    # simulated KV hooks.
    kv_cache: Callable[..., Cache] | None = None

    @property
    def runs_recipes(self) -> bool:
        return self.peer is None


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


def _native_layers(model: nn.Module, scheme: Scheme) -> list[str]:
    from sinkquant.backends.native import convert_to_native  # torch kernels: imported when first used

    embeddings = scheme.embeddings
    return convert_to_native(model, int8_head=embeddings is not None and embeddings.dtype == "int8")


def _int8_kv_cache(*args: Any) -> Cache:
    from sinkquant.backends.kv_cache import Int8KVCache

    return Int8KVCache(*args)


BACKENDS: dict[str, Backend] = {
    "simulated": Backend("simulated", "quantize-dequantize in floating point: any scheme, for research"),
    "native": Backend("native", "integer weights and CPU int8 kernels (sinkquant.backends.native), int8 KV "
                      "cache behind the fp prefix: the steps and scheme run as in 'simulated', then the quantized "
                      "layers are swapped", refuse=native_refusal, finalize=_native_layers,
                      kv_cache=_int8_kv_cache),
    **{name: Backend(name, peer.description, peer=peer) for name, peer in PEERS.items()},
}


def export_refusals(backend: str) -> list[str]:
    """Every export writes sinkquant's own integers and scales; a peer library's backend has none to write."""
    if BACKENDS[backend].runs_recipes:
        return []
    return [f"backend {backend!r}: a peer library's quantization has no sinkquant integers to export (valid: "
            "'simulated' or 'native')"]
