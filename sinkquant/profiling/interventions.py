"""Sun et al. 2024 (Massive Activations in LLMs, sec. 3.1): what the massive activations do, found by changing
them. At the output of the layer where they appear, the massive entries (Sun's criterion, restricted to the peak
channels) are set to zero, or to their mean value over sequences, and perplexity is compared with fp32 and with
a control that zeroes as many random ordinary entries (seeded). Sun et al. found zeroing destroys the model while
the mean leaves it unchanged: the entries act as fixed biases, which is why keeping them in full precision (or
out of a per-tensor scale) is enough."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from sinkquant.data import TokenStream, WindowPlan
from sinkquant.models import LoadedModel
from sinkquant.perplexity import evaluate
from sinkquant.profiling import metrics
from sinkquant.profiling.collectors import _tensor_output, _tokens

INTERVENTIONS = ("zero", "mean", "random_zero")


class _Intervention:
    """Forward hook on one decoder layer: records the massive entries of each window in the fp32 pass, then
    rewrites them (or a random control set) in the later passes. Windows are counted in forward order."""

    def __init__(self, channels: list[int], seed: int) -> None:
        self.channels = channels
        self.seed = seed
        self.mode = "record"
        self.window = 0
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []  # per window: (positions, channels)
        self.values: dict[int, list[float]] = defaultdict(list)
        self.means: dict[int, float] = {}

    def start(self, mode: str) -> None:
        self.mode, self.window = mode, 0
        if mode == "mean":
            self.means = {c: sum(v) / len(v) for c, v in self.values.items()}

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        h = _tensor_output(output)
        flat = _tokens(h)
        window, self.window = self.window, self.window + 1
        if self.mode == "record":
            h_abs = flat.abs()
            mask = torch.zeros_like(h_abs, dtype=torch.bool)
            mask[:, self.channels] = metrics.massive_mask(h_abs[:, self.channels], h_abs.median())
            positions, channels = torch.nonzero(mask, as_tuple=True)
            self.entries.append((positions, channels))
            for p, c in zip(positions.tolist(), channels.tolist(), strict=True):
                self.values[c].append(float(flat[p, c]))
            return None
        positions, channels = self.entries[window]
        edited = h.clone()
        view = edited.view(-1, edited.shape[-1])
        if self.mode == "zero":
            view[positions, channels] = 0.0
        elif self.mode == "mean":
            view[positions, channels] = torch.tensor([self.means[c] for c in channels.tolist()], dtype=h.dtype,
                                                     device=h.device)
        else:  # the control: as many entries, drawn among the ordinary ones
            generator = torch.Generator().manual_seed(self.seed + window)
            order = torch.randperm(flat.numel(), generator=generator).to(h.device)
            massive = (positions * flat.shape[1] + channels).to(h.device)
            pick = order[~torch.isin(order, massive)][: positions.numel()]
            view[pick // flat.shape[1], pick % flat.shape[1]] = 0.0
        return (edited, *output[1:]) if isinstance(output, tuple) else edited


def massive_interventions(loaded: LoadedModel, stream: TokenStream, ctx: int, windows: tuple[int, ...], bos: str,
                          layer: int, channels: list[int], seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Perplexity of `windows` (fp32, then each intervention at the output of decoder layer `layer`). The mean
    of each channel's massive entries is taken over the same windows' fp32 pass, as Sun et al. take it over
    sequences."""
    plan = WindowPlan(ctx=ctx, eval_windows=windows, calib_windows=())
    hook = _Intervention(channels, seed)
    handle = loaded.adapter.decoder_layers(loaded.model)[layer].register_forward_hook(hook)
    perplexity: dict[str, float] = {}
    try:
        for mode in ("record", *INTERVENTIONS):
            hook.start(mode)
            name = "fp32" if mode == "record" else mode
            perplexity[name] = evaluate(loaded, stream, plan, bos=bos, progress=progress, desc=name).ppl
    finally:
        handle.remove()
    counts = [int(p.numel()) for p, _ in hook.entries]
    return {
        "layer": layer, "channels": channels, "seed": seed, "windows": list(windows),
        "entries_per_window": counts, "mean_values": {str(c): v for c, v in sorted(hook.means.items())},
        "perplexity": perplexity,
        "ratio_vs_fp32": {k: v / perplexity["fp32"] for k, v in perplexity.items() if k != "fp32"},
    }
