"""Calibration one decoder layer at a time: capture what every decoder layer is called with (one cheap pass in
which each layer returns its input unchanged), then for layer i: quantize its weights (round-to-nearest, or
GPTQ from Hessians of its real inputs), run it with observers on, and feed its outputs to layer i+1. Peak
memory is the weights plus one layer's activations for the calibration windows, and it gives the same scales
as whole-model calibration (a test checks it) because layer i sees exactly the inputs it would see there."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Cache

from sinkquant.memory import release_freed_memory
from sinkquant.quant.gptq import HessianAccumulator, gptq_quantize
from sinkquant.quant.keep import keep_state
from sinkquant.quant.simulate import QuantLinear
from sinkquant.steps.session import Session


class _StopForward(Exception):
    """Raised after the last decoder layer: the rest of the model (final norm, lm_head) is not needed."""


@dataclass
class LayerCall:
    """The arguments a decoder layer received for one calibration window, its hidden states aside."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, calls: list[LayerCall], last: bool) -> None:
        super().__init__()
        self.layer, self.calls, self.last = layer, calls, last

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(LayerCall(args, kwargs))
        if self.last:
            raise _StopForward
        return args[0]

    def __getattr__(self, name: str) -> Any:  # attention_type etc. read by the model's loop
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


@torch.no_grad()
def capture_calls(session: Session) -> list[list[LayerCall]]:
    """calls[layer][window]: every decoder layer's arguments for every calibration window."""
    model, adapter = session.model, session.loaded.adapter
    layers = adapter.decoder_layers(model)
    calls: list[list[LayerCall]] = [[] for _ in layers]
    originals = list(layers)
    for index, layer in enumerate(originals):
        layers[index] = _Catcher(layer, calls[index], last=index == len(originals) - 1)
    try:
        for kwargs in session.batches():
            with contextlib.suppress(_StopForward):
                model(**kwargs)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return calls


def _fresh(value: Any, session: Session) -> Any:
    """A layer run must not see KV that an earlier run of the same layer appended: give it a new prefix cache."""
    if isinstance(value, Cache):
        return session.prefix.cache_for_batch(1) if session.prefix is not None else copy.deepcopy(value)
    return value


def layers_of(session: Session, index: int) -> dict[str, QuantLinear]:
    prefix = f"{session.loaded.adapter.layers}.{index}."
    return {name: module for name, module in session.quantized.items() if name.startswith(prefix)}


def rtn_weights(session: Session, index: int, layers: dict[str, QuantLinear], run: Callable[[], list]
                ) -> dict[str, Any]:
    """Round-to-nearest needs no data: quantize before the layer is run."""
    for layer in layers.values():
        if layer.weights_spec is not None:
            layer.quantize_rtn()
    return {}


def gptq_weights(session: Session, index: int, layers: dict[str, QuantLinear], run: Callable[[], list]
                 ) -> dict[str, Any]:
    """GPTQ: run the layer once with its floating-point weights and unquantized inputs (no static scale exists
    yet) to collect each Linear's Hessian from its real inputs (kept positions left out), then quantize every
    Linear of the layer from it."""
    targets = {name: m for name, m in layers.items() if m.weights_spec is not None}
    hessians = {name: HessianAccumulator(m.in_features, device=m.weight.device) for name, m in targets.items()}

    def make_hook(name: str, module: QuantLinear):
        def hook(_module, args):
            hessians[name].add(args[0], module.keep.mask_for(args[0]))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n, m)) for n, m in targets.items()]
    try:
        with contextlib.ExitStack() as stack:
            for module in layers.values():
                stack.enter_context(module.float_inputs())
            run()
    finally:
        for handle in handles:
            handle.remove()
    for name, module in targets.items():
        spec = module.weights_spec
        options = spec.gptq
        module.set_qweight(gptq_quantize(  # each accumulator freed once used, its float32 Hessian consumed
            module.weight, hessians.pop(name).hessian(torch.float32), spec.bits, spec.granularity, spec.group_size,
            spec.symmetric, damp=options.damp, act_order=options.act_order, block_size=options.block_size,
            mse_clip=options.mse_clip, overwrite_hessian=True))
    return {}


@torch.no_grad()
def calibrate_sequential(session: Session) -> dict[str, Any]:
    """Quantize (round-to-nearest or GPTQ, as the scheme says) and calibrate every decoder layer in turn."""
    calls = capture_calls(session)
    decoder = session.loaded.adapter.decoder_layers(session.model)
    keep = keep_state(session.model)
    window_ids = [w[None].to(session.device) for w in session.calibration]
    hidden = [call.args[0] for call in calls[0]]
    record: dict[str, Any] = {}
    bar = tqdm(range(len(decoder)), desc="calibrate", unit="layer", disable=not session.progress, leave=False)
    for index in bar:
        release_freed_memory()
        if session.stream is not None:  # read from disk (with the steps' weight changes) for this layer's turn
            session.stream.load(index)
        layer, layer_calls = decoder[index], calls[index]
        quantized = layers_of(session, index)

        def run(layer=layer, layer_calls=layer_calls, inputs=hidden) -> list[torch.Tensor]:
            outputs = []
            for window, (call, states) in enumerate(zip(layer_calls, inputs, strict=True)):
                if keep is not None:
                    keep.input_ids = window_ids[window]
                args = tuple(_fresh(a, session) for a in call.args[1:])
                kwargs = {k: _fresh(v, session) for k, v in call.kwargs.items()}
                outputs.append(layer(states, *args, **kwargs))
            return outputs

        weights = next((m.weights_spec for m in quantized.values() if m.weights_spec is not None), None)
        quantizer = gptq_weights if weights is not None and weights.gptq is not None else rtn_weights
        record.update(quantizer(session, index, quantized, run))
        observed = [m for m in quantized.values() if m.activations is not None and m.activations.mode == "static"]
        for module in observed:
            module.start_calibration()
        try:
            with contextlib.ExitStack() as stack:
                # the dequantized weights held across the windows: in memory a layer's worth beside the whole
                # model; streamed, where one layer is the peak, each window dequantizes again (the same values)
                for module in quantized.values() if session.stream is None else ():
                    stack.enter_context(module.holding(hidden[0].dtype if hidden else torch.float32))
                hidden = run()
        except BaseException:
            for module in observed:
                module.observer = None
            raise
        for module in observed:
            module.finish_calibration()
        if session.stream is not None:  # written to the artifact and freed
            session.stream.finish(index)
    return record
