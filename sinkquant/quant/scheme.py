"""Typed, validated description of a quantization scheme. Every bad value fails here, at construction,
with a one-line SinkquantError naming the field and the valid values, before any model work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from sinkquant.errors import SinkquantError

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_MODES = ("static", "dynamic-tensor", "dynamic-token")
OBSERVERS = ("absmax", "percentile", "mse")
KV_GRANULARITIES = ("head", "token")
GROUP_SIZES = (32, 64, 128)


def _check_choice(name: str, value: object, valid: tuple) -> None:
    if value not in valid:
        raise SinkquantError(f"{name}={value!r} is not valid; valid: {', '.join(map(str, valid))}")


def _check_bits(name: str, bits: int, valid: tuple[int, ...]) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in valid:
        raise SinkquantError(f"{name}={bits!r} is not valid; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class WeightSpec:
    """How Linear weights are fake-quantized (once, at swap time)."""

    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_bits("weights.bits", self.bits, (2, 3, 4, 5, 6, 7, 8))
        _check_choice("weights.granularity", self.granularity, WEIGHT_GRANULARITIES)
        if self.granularity == "group":
            _check_choice("weights.group_size", self.group_size, GROUP_SIZES)
        elif self.group_size is not None:
            raise SinkquantError(
                f"weights.group_size={self.group_size} only applies to granularity 'group' "
                f"(got granularity {self.granularity!r}); leave it None"
            )


@dataclass(frozen=True)
class ActivationSpec:
    """How the input of every quantized Linear is fake-quantized. `static` needs calibration batches."""

    bits: int = 8
    mode: str = "dynamic-token"
    observer: str = "absmax"
    percentile: float = 99.99
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_bits("activations.bits", self.bits, (4, 8))
        _check_choice("activations.mode", self.mode, ACTIVATION_MODES)
        _check_choice("activations.observer", self.observer, OBSERVERS)
        if not 50.0 < self.percentile <= 100.0:
            raise SinkquantError(f"activations.percentile={self.percentile} is not valid; valid: (50, 100]")
        if self.mode != "static" and self.observer != "absmax":
            raise SinkquantError(
                f"activations.observer={self.observer!r} needs mode 'static' (got {self.mode!r}); "
                "dynamic modes always use the absmax of the current tensor"
            )


@dataclass(frozen=True)
class KVSpec:
    """Dynamic fake-quant of the key/value cache (post-RoPE), one range per head or per token."""

    bits: int = 8
    granularity: str = "token"
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check_bits("kv.bits", self.bits, (4, 8))
        _check_choice("kv.granularity", self.granularity, KV_GRANULARITIES)


@dataclass(frozen=True)
class KeepPolicy:
    """Positions kept in full precision: absolute positions (0 = first token ever seen, including any cached
    prefix) and/or every occurrence of given token ids (e.g. BOS). Kept positions bypass activation and KV
    quantization and are left out of calibration statistics."""

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, values in (("keep.positions", self.positions), ("keep.token_ids", self.token_ids)):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
                raise SinkquantError(f"{name}={values!r} is not valid; valid: non-negative integers")

    def __bool__(self) -> bool:
        return bool(self.positions or self.token_ids)


@dataclass(frozen=True)
class QuantScheme:
    """A full simulated scheme. `exclude` holds fnmatch globs on full module names (e.g. 'model.layers.0.*');
    lm_head and embeddings are never touched because only decoder Linear layers are candidates."""

    weights: WeightSpec | None = field(default_factory=WeightSpec)
    activations: ActivationSpec | None = None
    kv: KVSpec | None = None
    exclude: tuple[str, ...] = ()
    keep: KeepPolicy = field(default_factory=KeepPolicy)

    def __post_init__(self) -> None:
        for name, value, kind in (
            ("weights", self.weights, WeightSpec),
            ("activations", self.activations, ActivationSpec),
            ("kv", self.kv, KVSpec),
            ("keep", self.keep, KeepPolicy),
        ):
            if value is not None and not isinstance(value, kind):
                raise SinkquantError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise SinkquantError(f"exclude={self.exclude!r} is not valid; valid: a tuple of module-name globs")
        if self.weights is None and self.activations is None and self.kv is None:
            raise SinkquantError("scheme quantizes nothing; set at least one of weights, activations, kv")

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and self.activations.mode == "static"
