"""The engine's working state while a recipe runs: the model being quantized (in place), the scheme, the
calibration windows, and what the steps have decided so far (prefix, kept positions, quantized layers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sinkquant.memory import release_freed_memory
from sinkquant.models import LoadedModel, model_device
from sinkquant.perplexity import Prefix
from sinkquant.quant.scheme import KeepPolicy, Scheme

if TYPE_CHECKING:
    from sinkquant.quant.stream import LayerStream


@dataclass
class Session:
    """Steps read and write these fields; the engine owns the order in which they run."""

    loaded: LoadedModel
    scheme: Scheme
    calibration: torch.Tensor  # [windows, ctx] token ids from the end of the text, never evaluation windows
    prefix: Prefix | None = None  # set by the prefix step: ids and their full-precision KV
    keep: KeepPolicy = field(default_factory=KeepPolicy)  # positions / ids that stay in full precision
    quantized: dict[str, nn.Module] = field(default_factory=dict)  # filled by the engine before REFINE steps
    profile_report: dict[str, Any] | None = None  # a profile the caller already has (the prefix step reuses it)
    progress: bool = True
    record: dict[str, Any] = field(default_factory=dict)  # what quantization did (layers, pipeline, seconds)
    # Measurements a caller shares between recipes applied to copies of one model (the auto search's candidates),
    # keyed by everything they depend on besides that model; None: nothing is shared.
    memo: dict[Any, Any] | None = None
    applied: list[dict[str, Any]] = field(default_factory=list)  # resolved steps run so far, in order (memo keys)
    # Streaming (engine/stream.py): the decoder layers live on disk and are read one at a time; None: in memory.
    stream: LayerStream | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def transform_layers(self, transform: Callable[[int, nn.Module], None]) -> None:
        """A weight change a step makes to every decoder layer, `transform(index, layer)`: applied to each layer
        now, or, when streaming, to each layer every time it is read from disk (the layer is not in memory now)."""
        if self.stream is not None:
            self.stream.add_transform(transform)
            return
        for index, layer in enumerate(self.loaded.adapter.decoder_layers(self.model)):
            transform(index, layer)

    def batches(self) -> Iterator[dict[str, Any]]:
        """Forward kwargs per calibration window, each with its own copy of the prefix KV, made as they are
        consumed: a window's cache grows by the whole window's KV (24 MB at 512 SmolLM2 tokens), so caches
        made up front would all live until the last window. Calibration reads the decoder's inputs only:
        logits for the last position alone (a window's full logits are 100 MB)."""
        prefix = self.prefix
        for window in self.calibration:
            release_freed_memory()
            yield {"input_ids": window[None].to(self.device),
                   "past_key_values": prefix.cache_for_batch(1) if prefix else None,
                   "use_cache": prefix is not None, "logits_to_keep": 1}
