"""`apply_recipe`: run a recipe's steps in their listed order around the scheme's quantization.

    TRANSFORM steps (prefix, smooth, keep_sink, ...)  ->  quantize (swap Linear layers, weights, static scales)
    ->  REFINE steps (exceptions, clip, ...)  ->  KV quantization switched on

The model is quantized in place (no whole-model copy) unless `copy=True`."""

from __future__ import annotations

import contextlib
import copy as copy_module
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Cache

from sinkquant.backends.registry import BACKENDS
from sinkquant.data import TokenStream, WindowPlan, plan_windows
from sinkquant.engine.pipeline import calibrate_sequential
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel, model_device
from sinkquant.perplexity import PerplexityResult, Prefix, evaluate
from sinkquant.quant.embeddings import round_embeddings
from sinkquant.quant.keep import attach_keep_state, keep_state
from sinkquant.quant.kv import enable_kv_quant
from sinkquant.quant.scheme import KeepPolicy, Scheme
from sinkquant.quant.simulate import calibrate, candidate_layers, check_group_size, swap_linears
from sinkquant.recipe import Recipe
from sinkquant.steps import Stage
from sinkquant.steps.session import Session

if TYPE_CHECKING:
    from sinkquant.quant.stream import LayerStream


@dataclass
class QuantizedModel:
    """A model quantized by a recipe, with its prefix and a record of what each step did."""

    base: LoadedModel
    model: nn.Module
    recipe: Recipe
    prefix: Prefix | None
    record: dict[str, Any] = field(default_factory=dict)
    layers: LayerStream | None = None  # an artifact loaded with stream=True: decoder layers read per forward

    def streaming(self) -> contextlib.AbstractContextManager:
        """Where forwards run: as they are, or reading the decoder layers one at a time (`layers`)."""
        return self.layers.streaming() if self.layers is not None else contextlib.nullcontext()

    def evaluate(self, stream: TokenStream, plan: WindowPlan, bos: str = "auto", progress: bool = True
                 ) -> PerplexityResult:
        """Perplexity on `plan`'s windows; a prefix replaces the BOS policy (it brings its own BOS, if any)."""
        if self.prefix is not None and bos == "per-window" and self.prefix.ids[:1] != [self.base.bos_id]:
            raise SinkquantError("this recipe's prefix has no BOS; evaluate it with --bos never or auto")
        with self.streaming():
            return evaluate(self.base, stream, plan, bos=bos if self.prefix is None else "never",
                            prefix=self.prefix, model=self.model, progress=progress, desc=self.recipe.name,
                            cache=self.cache_for_batch)

    def cache_for_batch(self, batch: int) -> Cache | None:
        """The KV cache a forward over `batch` rows starts from: the prefix's fp KV, or (a backend with a KV
        cache of its own, e.g. native's Int8KVCache, and scheme.kv) that cache seeded with the prefix and the
        keep state, which then quantizes the KV for real."""
        own = BACKENDS[self.recipe.backend].kv_cache(self.model.config, self.recipe.scheme, keep_state(self.model),
                                                     self.prefix)
        if own is not None:
            return own
        return None if self.prefix is None else self.prefix.cache_for_batch(batch)

    def step_record(self, name: str) -> dict[str, Any] | None:
        """What the step `name` recorded, or None when the recipe has no such step."""
        return next((r for r in self.record.get("steps", []) if r.get("step") == name), None)

    @property
    def prefix_tokens(self) -> list[str] | None:
        return (self.step_record("prefix") or {}).get("tokens")

    @torch.no_grad()
    def generate(self, text: str, max_new_tokens: int = 20) -> str:
        """Greedy generation with the prefix in front (its KV reused), returning the new text only."""
        tokenizer = self.base.tokenizer
        device = model_device(self.model)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                  "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
        if self.prefix is not None:
            ids = torch.cat([torch.tensor([self.prefix.ids], device=device), ids], dim=1)
        cache = self.cache_for_batch(1)
        if cache is not None:
            kwargs["past_key_values"] = cache
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def calibration_windows(stream: TokenStream, recipe: Recipe, ctx: int) -> torch.Tensor:
    """Calibration windows from the end of the text: never the evaluation windows (taken from the start)."""
    calib_ctx = recipe.calibration.ctx or ctx
    plan = plan_windows(stream, calib_ctx, max_windows=1, calib_windows=recipe.calibration.windows)
    return stream.windows(calib_ctx, list(plan.calib_windows))


def quantize_structure(session: Session, kv: bool = True) -> list[str]:
    """Swap the scheme's Linear layers for QuantLinear (weights still floating point), install the kept-position
    masks and (with `kv`) KV quantization: the structure both a new quantization and a reloaded artifact need.
    Returns the names of the decoder Linear layers the scheme excludes."""
    model, adapter, scheme = session.model, session.loaded.adapter, session.scheme
    layers, excluded = candidate_layers(model, adapter, scheme)
    check_group_size(layers, scheme.weights)
    state = attach_keep_state(model, adapter, session.keep)
    if scheme.weights is not None or scheme.activations is not None:
        session.quantized = swap_linears(model, layers, scheme, state)
    if kv and scheme.kv is not None:
        enable_kv_quant(model, adapter, scheme.kv, state)
    return excluded


def quantize_session(session: Session, pipeline: str = "sequential", kv: bool = True) -> dict[str, Any]:
    """Quantize weights and calibrate static scales (one decoder layer at a time or with whole-model forwards),
    then switch KV quantization on (unless `kv` is False: the native backend's Int8KVCache does it instead):
    activation scales are calibrated on full-precision KV."""
    excluded = quantize_structure(session, kv=False)
    scheme = session.scheme
    if scheme.embeddings is not None:
        round_embeddings(session.model, scheme.embeddings.dtype)
    record: dict[str, Any] = {"quantized_layers": len(session.quantized), "excluded": excluded,
                              "pipeline": pipeline}
    if scheme.needs_calibration and not len(session.calibration):
        raise SinkquantError("static activations need calibration windows (token ids disjoint from evaluation)")
    gptq = scheme.weights is not None and scheme.weights.gptq is not None
    if session.stream is not None or (pipeline == "sequential" and (scheme.needs_calibration or gptq)):
        record.update(calibrate_sequential(session))
    else:
        for module in session.quantized.values():
            if module.weights_spec is not None:
                module.quantize_rtn()
        if scheme.needs_calibration:
            calibrate(session.model, session.quantized.values(), session.batches())
    if kv and scheme.kv is not None:
        enable_kv_quant(session.model, session.loaded.adapter, scheme.kv, keep_state(session.model))
    return record


def quantize_model(
    loaded: LoadedModel, scheme: Scheme, calibration: torch.Tensor | None = None, keep: KeepPolicy | None = None,
    pipeline: str = "sequential", progress: bool = False,
) -> Session:
    """The scheme alone, no recipe steps, in place: `calibration` is [windows, seq] token ids (needed for static
    activations), `keep` the positions / ids left in full precision. Returns the session (its `quantized`
    layers and `record`)."""
    device = model_device(loaded.model)
    windows = calibration if calibration is not None else torch.empty(0, 0, dtype=torch.long)
    session = Session(loaded=_working_copy(loaded, copy=False), scheme=scheme, calibration=windows.to(device),
                      keep=keep or KeepPolicy(), progress=progress)
    session.record = quantize_session(session, pipeline)
    return session


def _working_copy(loaded: LoadedModel, copy: bool) -> LoadedModel:
    if keep_state(loaded.model) is not None:
        raise SinkquantError("this model is already quantized by sinkquant; reload it, or pass copy=True on its "
                             "first use so the original stays untouched")
    return replace(loaded, model=copy_module.deepcopy(loaded.model)) if copy else loaded


def apply_recipe(
    loaded: LoadedModel, recipe: Recipe, stream: TokenStream, ctx: int, profile_report: dict | None = None,
    copy: bool = False, progress: bool = False, memo: dict | None = None, layers: LayerStream | None = None,
) -> QuantizedModel:
    """Quantize `loaded.model` by `recipe` (in place; `copy=True` keeps the original), calibrating on windows
    disjoint from evaluation. `memo` (with `copy=True` on one unchanged model) lets steps reuse what an earlier
    call measured on the same state (`Session.memo`). `layers`: the decoder layers are read from disk one at a
    time and written out as they are done (engine/stream.py `quantize_streaming`)."""
    torch.manual_seed(0)
    windows = calibration_windows(stream, recipe, ctx)
    record: dict[str, Any] = {"calibration": {"windows": windows.shape[0], "ctx": windows.shape[1],
                                              "range": "last windows of the text (evaluation uses the first)"}}
    start = time.perf_counter()
    backend = BACKENDS[recipe.backend]

    def run_recipe() -> QuantizedModel:
        target = _working_copy(loaded, copy)
        device = model_device(target.model)
        session = Session(loaded=target, scheme=recipe.scheme, calibration=windows.to(device),
                          profile_report=profile_report, progress=progress, memo=memo, stream=layers)
        steps: list[dict[str, Any]] = []
        for stage in (Stage.TRANSFORM, None, Stage.REFINE):
            if stage is None:
                record["quantize"] = quantize_session(session, recipe.calibration.pipeline, kv=backend.simulated_kv)
                continue
            for step in (s for s in recipe.steps if s.stage == stage):
                clock = time.perf_counter()
                steps.append({"step": step.name, "seconds": None, **step.apply(session)})
                steps[-1]["seconds"] = time.perf_counter() - clock
                session.applied.append(step.resolved())
        record["steps"] = steps
        record.update(backend.finalize(target.model, recipe.scheme))
        record["keep"] = {"positions": list(session.keep.positions), "token_ids": list(session.keep.token_ids)}
        return QuantizedModel(base=target, model=target.model, recipe=recipe, prefix=session.prefix, record=record)

    quantized = backend.quantize(loaded.model, windows, run_recipe, lambda model: QuantizedModel(
        base=loaded, model=model, recipe=recipe, prefix=None, record=record))
    record["seconds"] = time.perf_counter() - start
    return quantized


# Steps whose whole-model forwards come before quantization and whose weight changes go through
# `Session.transform_layers`; the others (rotate, clip) change or run the whole model after that.
STREAMED_STEPS = ("prefix", "smooth", "exceptions", "keep_sink", "act")


def streaming_refusal(recipe: Recipe) -> str | None:
    """Why `recipe` cannot be streamed, or None."""
    refusal = BACKENDS[recipe.backend].streaming_refusal()
    if refusal is not None:
        return refusal
    if recipe.calibration.pipeline != "sequential":
        return "calibration.pipeline 'whole' runs whole-model forwards after quantization; use 'sequential'"
    for step in recipe.steps:
        if step.name not in STREAMED_STEPS:
            return (f"step {step.name!r} changes the whole model at once or runs it after quantization (streamed: "
                    f"{', '.join(STREAMED_STEPS)})")
    return None
