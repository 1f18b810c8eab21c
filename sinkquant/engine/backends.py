"""The backends a recipe can name, in one registry: sinkquant's own (the recipe's steps and scheme run through
the engine) and peer libraries that quantize by their own rules (compared against, never mixed with steps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sinkquant.quant.backends import BACKENDS as PEERS
from sinkquant.quant.scheme import Scheme


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    runs_recipes: bool  # True: sinkquant's engine applies the steps and scheme; False: a peer library's own rules
    refuse: Callable[[Scheme], str | None] | None = None  # what the backend cannot run, decided by the recipe alone


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


BACKENDS: dict[str, Backend] = {
    "simulated": Backend("simulated", "quantize-dequantize in floating point: any scheme, for research", True),
    "native": Backend("native", "integer weights and CPU int8 kernels (sinkquant.backends.native), int8 KV "
                      "cache behind the fp prefix: the steps and scheme run as in 'simulated', then the quantized "
                      "layers are swapped", True, native_refusal),
    **{name: Backend(name, text, False) for name, text in PEERS.items()},
}
