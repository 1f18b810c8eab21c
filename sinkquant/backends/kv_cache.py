"""An int8 KV cache on transformers' cache API: keys and values are stored as 8-bit integers with one scale and
zero point per (batch, head, token) (asymmetric by default, the grid of `sinkquant.quant.kv.fake_quant_kv` with
granularity "token", so the dequantized states equal the simulator's bit for bit), while the fp prefix KV and
kept positions (sink tokens) are stored beside them in full precision.

Usage (generate or a plain forward):
    cache = Int8KVCache(model.config, keep=keep_state, prefix=prefix)   # prefix: sinkquant.perplexity.Prefix
    model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
`input_ids` holds only the tokens after the prefix; positions continue after it."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sinkquant.backends.native import Keep
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import Prefix
from sinkquant.quant.primitives import qrange, scale_zero_point
from sinkquant.quant.scheme import KVScheme


class Int8KVLayer(DynamicLayer):
    """One attention layer's cache: `prefix_keys/values` (float, the precomputed prefix), `q_keys/q_values`
    [batch, heads, tokens, head_dim] (uint8, or int8 when symmetric) with float32 `*_scale` and 8-bit
    `*_zero_point` per token, and full-precision copies of kept positions (`kept_keys/values` at `kept_index`,
    the union over the batch; `kept_mask` [batch, tokens] says which rows each position is kept for)."""

    def __init__(self, spec: KVScheme, keep: Keep | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.keep = keep
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self.stored: dict[str, torch.Tensor] = {}
        self.kept_index = torch.zeros(0, dtype=torch.long)
        self.kept_mask: torch.Tensor | None = None
        self.kept_keys: torch.Tensor | None = None
        self.kept_values: torch.Tensor | None = None
        self.length = 0

    def set_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.prefix_keys, self.prefix_values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]

    def _quantize(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bits, symmetric = self.spec.bits, self.spec.symmetric
        scale, zero_point = scale_zero_point(states.amin(dim=-1, keepdim=True), states.amax(dim=-1, keepdim=True),
                                             bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        q = torch.clamp(torch.round(states / scale) + zero_point, qmin, qmax)
        dtype = torch.int8 if symmetric else torch.uint8
        return q.to(dtype), scale.float(), zero_point.to(dtype)

    def _dequantize(self, name: str) -> torch.Tensor:
        q = self.stored[f"q_{name}"].to(torch.float32)
        zero_point = self.stored[f"{name}_zero_point"].to(torch.float32)
        return ((q - zero_point) * self.stored[f"{name}_scale"]).to(self.dtype)

    def _append(self, name: str, states: torch.Tensor) -> None:
        parts = (f"q_{name}", f"{name}_scale", f"{name}_zero_point")
        for part, tensor in zip(parts, self._quantize(states), strict=True):
            old = self.stored.get(part)
            self.stored[part] = tensor if old is None else torch.cat([old, tensor], dim=-2)

    def _record_kept(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Keep full-precision copies of the new positions the keep mask marks (any batch row)."""
        if self.keep is None:
            return
        mask = getattr(self.keep, "kv_mask", None)
        new = key_states.shape[-2]
        if mask is None:
            return
        new_mask = mask[:, -new:]
        if new_mask.shape[0] != key_states.shape[0]:
            raise SinkquantError(f"keep mask batch {new_mask.shape[0]} does not match the KV batch "
                                 f"{key_states.shape[0]}")
        columns = new_mask.any(dim=0).nonzero().squeeze(1)
        if columns.numel() == 0:
            return
        keys, values = key_states[:, :, columns], value_states[:, :, columns]
        rows = new_mask[:, columns]
        index = columns.cpu() + self.length
        if self.kept_keys is None:
            self.kept_keys, self.kept_values, self.kept_mask, self.kept_index = keys, values, rows, index
        else:
            self.kept_keys = torch.cat([self.kept_keys, keys], dim=-2)
            self.kept_values = torch.cat([self.kept_values, values], dim=-2)
            self.kept_mask = torch.cat([self.kept_mask, rows], dim=-1)
            self.kept_index = torch.cat([self.kept_index, index])

    def _full(self, name: str) -> torch.Tensor:
        states = self._dequantize(name)
        if self.kept_keys is not None:
            kept = self.kept_keys if name == "keys" else self.kept_values
            index = self.kept_index.to(states.device)
            chosen = torch.where(self.kept_mask[:, None, :, None], kept, states.index_select(2, index))
            states = states.index_copy(2, index, chosen)
        prefix = self.prefix_keys if name == "keys" else self.prefix_values
        if prefix is not None:
            states = torch.cat([prefix.expand(states.shape[0], -1, -1, -1), states], dim=-2)
        return states

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._record_kept(key_states, value_states)
        self._append("keys", key_states)
        self._append("values", value_states)
        self.length += key_states.shape[-2]
        return self._full("keys"), self._full("values")

    def get_seq_length(self) -> int:
        return self.prefix_length + self.length

    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (integers, scales, zero points, fp prefix and kept copies)."""
        tensors = [*self.stored.values(), self.prefix_keys, self.prefix_values, self.kept_keys, self.kept_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def crop(self, tokens_to_remove: int) -> None:
        raise SinkquantError("Int8KVCache does not support crop (assisted or speculative decoding); use greedy or "
                             "sampling generate")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise SinkquantError("Int8KVCache does not support beam search (num_beams > 1); build one cache per batch")


class Int8KVCache(Cache):
    """Int8 KV cache for every attention layer of a model, optionally behind a precomputed fp prefix."""

    def __init__(self, config, spec: KVScheme | None = None, keep: Keep | None = None,
                 prefix: Prefix | None = None) -> None:
        spec = spec or KVScheme(bits=8, granularity="token", symmetric=False)
        if spec.granularity != "token" or spec.bits != 8:
            raise SinkquantError(f"kv granularity={spec.granularity!r} bits={spec.bits} is not stored by "
                                 "Int8KVCache; valid: granularity 'token', bits 8")
        text = config.get_text_config(decoder=True)
        if any(t != "full_attention" for t in getattr(text, "layer_types", None) or ()):
            raise SinkquantError(f"{text.model_type}: sliding-window layers are not supported by Int8KVCache; "
                                 "valid: models whose layers all use full attention")
        layers = [Int8KVLayer(spec, keep) for _ in range(text.num_hidden_layers)]
        if prefix is not None and prefix.cache is not None:
            if len(prefix.cache.layers) != len(layers):
                raise SinkquantError(f"prefix KV has {len(prefix.cache.layers)} layers, the model "
                                     f"{len(layers)}; build the prefix with this model")
            for layer, source in zip(layers, prefix.cache.layers, strict=True):
                layer.set_prefix(source.keys.clone(), source.values.clone())
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
