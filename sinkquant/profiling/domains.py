"""Guo et al. 2024 (Active-Dormant Attention Heads): a head can be dormant (all attention on the sink, near-zero
row entropy) on one kind of text and active on another, so the dormant set is a property of (head, domain).
Given several named texts, the profile measures every head's sink share alpha_0 and mean row entropy per text and
lists the heads that are dormant on one text and active on another."""

from __future__ import annotations

import random
from typing import Any

import torch

from sinkquant.data import Text
from sinkquant.profiling import metrics

NUMBERS_SEED = 0


def numbers_text(count: int = 5_000, seed: int = NUMBERS_SEED) -> Text:
    """A list of integers (one line of 10 comma-separated numbers each), drawn with a fixed seed: a second
    domain as unlike prose as a text can be, made here so it needs no download and is the same everywhere."""
    rng = random.Random(seed)
    numbers = [str(rng.randrange(0, 10_000)) for _ in range(count)]
    lines = [", ".join(numbers[i : i + 10]) for i in range(0, count, 10)]
    return Text(text="\n".join(lines) + "\n", source={"kind": "generated", "generator": "numbers_text",
                                                      "count": count, "seed": seed})


def domain_heads(alpha0: dict[str, torch.Tensor], entropy: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per text: (layers, heads) alpha_0 and row entropy, the dormant heads (metrics.dormant_heads); and the heads
    dormant on some text while active on another, sorted by how far their sink share moves."""
    names = list(alpha0)
    dormant = {name: metrics.dormant_heads(alpha0[name], entropy[name]) for name in names}
    switching = []
    for layer, head in torch.nonzero(torch.stack(list(dormant.values())).any(dim=0)).tolist():
        on = [n for n in names if dormant[n][layer, head]]
        off = [n for n in names if not dormant[n][layer, head]]
        if on and off:
            shares = {n: float(alpha0[n][layer, head]) for n in names}
            switching.append({"layer": layer, "head": head, "dormant_on": on, "active_on": off, "alpha0": shares,
                              "entropy": {n: float(entropy[n][layer, head]) for n in names},
                              "alpha0_gap": max(shares.values()) - min(shares.values())})
    switching.sort(key=lambda r: (-r["alpha0_gap"], r["layer"], r["head"]))
    return {
        "texts": names,
        "alpha0": {n: alpha0[n].tolist() for n in names},
        "row_entropy": {n: entropy[n].tolist() for n in names},
        "dormant_heads": {n: [[int(lh[0]), int(lh[1])] for lh in torch.nonzero(dormant[n]).tolist()] for n in names},
        "switching_heads": switching,
    }
