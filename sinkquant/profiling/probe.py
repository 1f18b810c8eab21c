"""Where a sink comes from: is it chosen by position (position 0 stays a sink whatever token stands there) or
by content (a token such as a delimiter becomes a sink wherever it is put), and what a BOS token changes.
A position counts as a sink when it carries a massive residual activation (Sun et al.) in some layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sinkquant.models import LoadedModel
from sinkquant.profiling.collectors import residual_peaks

PROBE_TOKENS = 128  # long enough for the sink to form, short enough for a dozen forwards to be cheap


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


class _Peaks:
    """residual_peaks with a memo: the base sequence serves the position, content and BOS tests alike."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.seen: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(ids)
        if key not in self.seen:
            self.seen[key] = residual_peaks(self.loaded, ids)
        return self.seen[key]

    def at(self, ids: list[int], position: int) -> tuple[float, bool]:
        ratio, massive = self(ids)
        return float(ratio[position]), bool(massive[:, position].any())

    def layers(self, ids: list[int], position: int) -> torch.Tensor:
        """Per decoder layer: is `position` massive there."""
        return self(ids)[1][:, position]


def _first(mask: torch.Tensor) -> int | None:
    hits = torch.nonzero(mask).flatten()
    return int(hits[0]) if hits.numel() else None


def _per_layer(by_position: torch.Tensor, by_content: torch.Tensor) -> dict[str, Any]:
    """Yan et al.'s question, layer by layer: is the waiver (sink) element there chosen by position (position 0
    is massive whatever token stands there), by content (a planted token is massive in the middle), or both."""
    names = {(True, True): "position+content", (True, False): "position", (False, True): "content",
             (False, False): "none"}
    return {
        "position_from_layer": _first(by_position), "content_from_layer": _first(by_content),
        "layers": [names[(bool(p), bool(c))] for p, c in zip(by_position, by_content, strict=True)],
    }


def origin_probe(loaded: LoadedModel, base: list[int], candidates: list[int],
                 decode: Callable[[int], str]) -> dict[str, Any]:
    """Swap the token at position 0 (position test), plant each candidate in the middle (content test), and
    run with and without BOS. `base` is plain text (no BOS); `candidates` are ids suspected to be sinks."""
    base = base[:PROBE_TOKENS]
    peaks = _Peaks(loaded)
    mid = len(base) // 2
    position = []
    for token in _unique([base[0], base[1], base[mid], base[-1]]):
        ratio, sink = peaks.at([token, *base[1:]], 0)
        position.append({"token_id": token, "token": decode(token), "peak_ratio": ratio, "sink": sink})
    control_ratio, control_sink = peaks.at(base, mid)
    content = [{"token_id": base[mid], "token": decode(base[mid]), "control": True,
                "peak_ratio": control_ratio, "sink": control_sink}]
    for token in _unique([base[0], *candidates]):
        if token == base[mid]:
            continue
        planted = [*base[:mid], token, *base[mid + 1 :]]
        ratio, sink = peaks.at(planted, mid)
        content.append({"token_id": token, "token": decode(token), "control": False,
                        "peak_ratio": ratio, "sink": sink})
    layer_position = torch.stack([peaks.layers([p["token_id"], *base[1:]], 0) for p in position]).all(dim=0)
    planted_ids = [c["token_id"] for c in content if not c["control"]]
    layer_content = torch.zeros_like(layer_position)
    for token in planted_ids:
        layer_content |= peaks.layers([*base[:mid], token, *base[mid + 1 :]], mid)
    layer_content &= ~peaks.layers(base, mid)  # the middle position itself is no sink in the control
    by_position = all(p["sink"] for p in position)
    by_content = [c["token_id"] for c in content if c["sink"] and not c["control"]]
    origin = {(True, True): "position+content", (True, False): "position",
              (False, True): "content", (False, False): "none"}[(by_position, bool(by_content))]
    result: dict[str, Any] = {
        "tokens": len(base), "middle_position": mid, "origin": origin, "content_sink_ids": by_content,
        "position_test": position, "content_test": content, "per_layer": _per_layer(layer_position, layer_content),
    }
    bos = loaded.bos_id
    if bos is None:
        result["bos_test"] = {"bos_id": None, "note": "the tokenizer defines no BOS token"}
        return result
    ratio0, sink0 = peaks.at(base, 0)
    ratio_with, layers_with = peaks([bos, *base[:-1]])
    massive_with = layers_with.any(dim=0)
    result["bos_test"] = {
        "bos_id": bos, "bos_token": decode(bos),
        "without_bos": {"first_token_peak_ratio": ratio0, "first_token_sink": sink0},
        "with_bos": {"bos_peak_ratio": float(ratio_with[0]), "bos_sink": bool(massive_with[0]),
                     "first_text_peak_ratio": float(ratio_with[1]), "first_text_sink": bool(massive_with[1])},
        "bos_takes_sink": bool(massive_with[0]) and not bool(massive_with[1]),
    }
    return result
