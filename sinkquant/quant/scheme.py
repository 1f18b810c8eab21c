"""The one typed description of a quantization scheme, shared by the recipe parser, the engine and the artifact:
pydantic models whose validators refuse every bad value at parse time, before any model work, with the field
path and what would be valid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sinkquant.errors import SinkquantError

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACTIVATION_BITS = (4, 8)
MAX_WIDTH = 1 << 16  # group and GPTQ block sizes beyond any Linear's input width (which they must not exceed anyway)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPTQConfig(_Strict):
    """GPTQ (Frantar et al. 2023) options; Hessians come from the calibration windows, sinks left out."""

    damp: float = Field(default=0.01, gt=0.0, le=1.0, description="dampening, a fraction of the mean diagonal")
    act_order: bool = False
    block_size: int = Field(default=128, ge=1, le=MAX_WIDTH)
    mse_clip: bool = False


class WeightScheme(_Strict):
    """How Linear weights are quantized: the grid (bits, granularity, symmetry) and the method that rounds onto it
    (round-to-nearest by default, GPTQ when `gptq` is given)."""

    bits: int = 8
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = Field(default=None, ge=2, le=MAX_WIDTH)
    symmetric: bool = True
    gptq: GPTQConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> WeightScheme:
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"bits={self.bits} is not valid; valid: {', '.join(map(str, WEIGHT_BITS))}")
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (a divisor of every quantized layer's input width)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} only applies to granularity 'group' "
                             f"(got {self.granularity!r}); leave it out")
        return self


class ActivationScheme(_Strict):
    """How the input of every quantized Linear is quantized. `static` scales are calibrated once."""

    bits: int = 8
    mode: Literal["static", "dynamic-tensor", "dynamic-token"] = "static"
    observer: Literal["absmax", "percentile", "mse"] = "absmax"
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    symmetric: bool = True

    @model_validator(mode="after")
    def _check(self) -> ActivationScheme:
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"bits={self.bits} is not valid; valid: {', '.join(map(str, ACTIVATION_BITS))}")
        if self.mode != "static" and self.observer != "absmax":
            raise ValueError(f"observer={self.observer!r} needs mode 'static' (got {self.mode!r}); dynamic modes "
                             "always use the absmax of the current tensor")
        return self


class KVScheme(_Strict):
    """Dynamic quantization of the key/value cache (post-RoPE), one range per head or per token."""

    bits: int = 8
    granularity: Literal["head", "token"] = "token"
    symmetric: bool = False

    @model_validator(mode="after")
    def _check(self) -> KVScheme:
        if self.bits not in ACTIVATION_BITS:
            raise ValueError(f"bits={self.bits} is not valid; valid: {', '.join(map(str, ACTIVATION_BITS))}")
        return self


class EmbeddingScheme(_Strict):
    """The token embedding and lm_head (tied or not) rounded in memory to what the artifact stores: a 16-bit
    float, or int8 with one scale per row (quant/embeddings.py). The evaluated perplexity is the artifact's."""

    dtype: Literal["float16", "bfloat16", "int8"] = "float16"


class Scheme(_Strict):
    """A full scheme. `exclude` holds fnmatch globs on module names (e.g. 'model.layers.0.*'); lm_head and
    embeddings are never quantized because only decoder Linear layers are candidates."""

    weights: WeightScheme | None = None
    activations: ActivationScheme | None = None
    kv: KVScheme | None = None
    embeddings: EmbeddingScheme | None = None  # default off: embeddings stay in the model's own dtype
    exclude: tuple[str, ...] = ()

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and self.activations.mode == "static"

    @property
    def empty(self) -> bool:
        return self.weights is None and self.activations is None and self.kv is None


@dataclass(frozen=True)
class KeepPolicy:
    """Positions kept in full precision: absolute positions (0 = the first token ever seen, a cached prefix
    included) and/or every occurrence of given token ids. Kept positions bypass activation and KV quantization
    and are left out of calibration statistics."""

    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, values in (("keep.positions", self.positions), ("keep.token_ids", self.token_ids)):
            if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
                raise SinkquantError(f"{name}={values!r} is not valid; valid: non-negative integers")

    def __bool__(self) -> bool:
        return bool(self.positions or self.token_ids)

    def merged(self, positions: tuple[int, ...] = (), token_ids: tuple[int, ...] = ()) -> KeepPolicy:
        return KeepPolicy(positions=tuple(sorted(set(self.positions) | set(positions))),
                          token_ids=tuple(sorted(set(self.token_ids) | set(token_ids))))
