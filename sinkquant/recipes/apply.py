"""Apply a recipe: prefix (fp KV computed once), SmoothQuant migration, sink positions kept in full precision,
calibrated static scales, per-layer exceptions, per-layer clipping. The steps always run in that order,
whatever the listing order, because each needs the one before (e.g. clipping searches the calibrated range)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sinkquant.data import TokenStream, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.models import LoadedModel
from sinkquant.perplexity import PerplexityResult, Prefix, build_prefix, evaluate
from sinkquant.quant import KeepPolicy, KeepState, QuantLinear, quantize_model
from sinkquant.quant.backends import quantize_backend
from sinkquant.recipes.clip import clip_activations
from sinkquant.recipes.prefix import greedy_prefix, token_id, with_bos
from sinkquant.recipes.schema import Recipe
from sinkquant.recipes.smooth import smooth_model

GREEDY_SAMPLE_TOKENS = 128
# Prefix selection profiles only a few calibration windows: the PrefixQuant rule is stable on SmolLM2 from 2 on.
PROFILE_WINDOWS = 2


@dataclass
class QuantizedModel:
    """A model quantized by a recipe, with its prefix and a record of what each step did."""

    base: LoadedModel
    model: nn.Module
    recipe: Recipe
    prefix: Prefix | None
    record: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, stream: TokenStream, plan, bos: str = "auto", progress: bool = True) -> PerplexityResult:
        if self.prefix is not None and bos == "per-window" and self.prefix.ids[:1] != [self.base.bos_id]:
            raise SinkquantError("this recipe's prefix has no BOS; evaluate it with --bos never or auto")
        return evaluate(self.base, stream, plan, bos=bos if self.prefix is None else "never", prefix=self.prefix,
                        model=self.model, progress=progress, desc=self.recipe.name)

    @torch.no_grad()
    def generate(self, text: str, max_new_tokens: int = 20) -> str:
        """Greedy generation with the prefix in front (its KV reused), returning the new text only."""
        tokenizer = self.base.tokenizer
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                                  "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
        if self.prefix is not None:
            ids = torch.cat([torch.tensor([self.prefix.ids]), ids], dim=1)
            kwargs["past_key_values"] = self.prefix.cache_for_batch(1)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def calibration_windows(stream: TokenStream, recipe: Recipe, ctx: int) -> torch.Tensor:
    """Calibration windows from the end of the text: never the evaluation windows (taken from the start)."""
    calib_ctx = recipe.calibration.ctx or ctx
    plan = plan_windows(stream, calib_ctx, max_windows=1, calib_windows=recipe.calibration.windows)
    return stream.windows(calib_ctx, list(plan.calib_windows))


def forward_batches(windows: torch.Tensor, prefix: Prefix | None) -> list[dict[str, Any]]:
    """Forward kwargs per calibration window; each gets its own copy of the prefix cache."""
    return [
        {"input_ids": w[None], "past_key_values": prefix.cache_for_batch(1) if prefix else None,
         "use_cache": prefix is not None}
        for w in windows
    ]


def select_prefix(loaded: LoadedModel, recipe: Recipe, windows: torch.Tensor, profile_report: dict | None):
    step = recipe.step("prefix")
    if isinstance(step.tokens, list):
        ids = [token_id(loaded, t, f"prefix.tokens[{i}]") for i, t in enumerate(step.tokens)]
        return with_bos(loaded, ids, step.bos)[: step.max_tokens], {"source": "recipe"}
    head = with_bos(loaded, [], step.bos)
    if len(head) >= step.max_tokens:  # BOS alone fills the prefix: no ranking can change it, skip the search
        return head[: step.max_tokens], {"source": "bos"}
    if step.tokens == "greedy":
        sample = windows[:2, :GREEDY_SAMPLE_TOKENS]
        ids, trace = greedy_prefix(loaded, sample, step.max_tokens, step.bos)
        return ids, {"source": "greedy", "trace": trace}
    if profile_report is None:
        from sinkquant.profiling import profile

        sample = windows[:PROFILE_WINDOWS]
        profile_report = profile(loaded, _stream_of(sample), ctx=sample.shape[1], windows=sample.shape[0],
                                 bos="never", progress=False, probe=False)
    verdict = profile_report["verdict"]
    ids = with_bos(loaded, verdict["prefix_ids"], step.bos)[: step.max_tokens]
    return ids, {"source": "profile", "verdict_prefix": verdict["prefix_ids"]}


def _stream_of(windows: torch.Tensor) -> TokenStream:
    return TokenStream(ids=windows.reshape(-1), text_sha256="calibration windows", source={"kind": "calibration"})


def widest_static_inputs(model: nn.Module, top: int) -> list[str]:
    """The `top` QuantLinear layers whose calibrated static activation range is widest, widest first."""
    static = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.act_scale is not None}
    if not static:
        raise SinkquantError("the exceptions step needs static activations (scheme.activations.mode: static)")
    return sorted(static, key=lambda n: (-float(static[n].act_scale), n))[:top]


def release_activations(model: nn.Module, names: list[str]) -> None:
    """Per-layer exception: these layers keep full-precision inputs (their weights stay quantized)."""
    for name in names:
        model.get_submodule(name).activations = None


def apply_recipe(
    loaded: LoadedModel, recipe: Recipe, stream: TokenStream, ctx: int, profile_report: dict | None = None,
) -> QuantizedModel:
    """Quantize a copy of `loaded.model` by `recipe`, calibrating on windows disjoint from evaluation."""
    torch.manual_seed(0)
    windows = calibration_windows(stream, recipe, ctx)
    record: dict[str, Any] = {"calibration": {"windows": windows.shape[0], "ctx": windows.shape[1],
                                              "range": "last windows of the text (evaluation uses the first)"}}
    start = time.perf_counter()
    if recipe.backend != "simulated":
        model = quantize_backend(loaded.model, recipe.backend, calib_batches=list(windows[:, None]))
        record["seconds"] = time.perf_counter() - start
        return QuantizedModel(base=loaded, model=model, recipe=recipe, prefix=None, record=record)

    prefix = None
    if recipe.step("prefix") is not None:
        ids, record["prefix"] = select_prefix(loaded, recipe, windows, profile_report)
        record["prefix"].update(ids=ids, tokens=[loaded.tokenizer.decode([i]) for i in ids],
                                seconds=time.perf_counter() - start)
        prefix = build_prefix(loaded.model, ids)
    keep_step = recipe.step("keep_sink")
    prefix_len = len(prefix.ids) if prefix else 0
    keep = KeepPolicy(
        positions=tuple(sorted(set(range(prefix_len)) | set(keep_step.positions if keep_step else ()))),
        token_ids=tuple(keep_step.token_ids) if keep_step else (),
    )
    record["keep"] = {"positions": list(keep.positions), "token_ids": list(keep.token_ids)}
    model = copy.deepcopy(loaded.model)
    smooth = recipe.step("smooth")
    if smooth is not None:
        record["smooth"] = smooth_model(loaded, model, forward_batches(windows, prefix), KeepState(keep), smooth.alpha)
    summary = quantize_model(model, loaded.adapter, recipe.quant_scheme(keep),
                             calib_batches=forward_batches(windows, prefix))
    record["quantized_layers"] = len(summary.quantized)
    record["calibration"]["kept_tokens"] = summary.calibration_kept_tokens
    exceptions = recipe.step("exceptions")
    if exceptions is not None:
        record["exceptions"] = widest_static_inputs(model, exceptions.top)
        release_activations(model, record["exceptions"])
    clip = recipe.step("clip")
    if clip is not None:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        ratios = clip_activations(model, layers, forward_batches(windows, prefix),
                                  clip.grid, clip.min_ratio, clip.samples)
        record["clip"] = {"mean_ratio": sum(ratios.values()) / max(len(ratios), 1), "ratios": ratios}
    record["seconds"] = time.perf_counter() - start
    return QuantizedModel(base=loaded, model=model, recipe=recipe, prefix=prefix, record=record)
