"""ACT (Yu et al. 2024) as a recipe step: the calibrated attention against an explicit re-implementation of the
formula, on every architecture (beta = 1 changes nothing, the result stays causal, restore reproduces apply), and
on SmolLM2 (heads chosen on calibration windows only, fp32 perplexity of the evaluation windows)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from pydantic import ValidationError

from sinkquant.data import TokenStream
from sinkquant.errors import SinkquantError
from sinkquant.io import to_json
from sinkquant.models import LoadedModel
from sinkquant.perplexity import evaluate
from sinkquant.quant.attention import ATTENTION_NAME, add_transform
from sinkquant.quant.scheme import Scheme
from sinkquant.steps.act import ActConfig, ActState, ActStep, act_attention, additive_mask, calibrate, install
from sinkquant.steps.session import Session
from tests.tiny import ARCHS, tiny_model

CTX = 64


def _session(loaded: LoadedModel, calibration: torch.Tensor) -> Session:
    """The engine's session with no quantization scheme: ACT runs on the full-precision model."""
    return Session(loaded=loaded, scheme=Scheme(), calibration=calibration, progress=False)


def _explicit(weights: torch.Tensor, value: torch.Tensor, state: ActState) -> torch.Tensor:
    """ACT written out query by query: running column mean, sinks scaled by beta, the mass given back."""
    b, h, t, _ = weights.shape
    groups = h // value.shape[1]
    out = weights @ value.repeat_interleave(groups, dim=1)
    for head in state.heads:
        for q in range(t):
            row = weights[0, head, q].clone()
            sinks = [k for k in range(1, q + 1)
                     if q - k + 1 >= state.min_queries and weights[0, head, k : q + 1, k].mean() > state.threshold]
            mass = row[sinks].sum()
            rest = [k for k in range(t) if k not in sinks]
            row[sinks] *= state.beta
            row[rest] *= (1 - state.beta * mass) / (1 - mass)
            assert torch.isclose(row.sum(), torch.tensor(1.0), atol=1e-5)
            out[0, head, q] = row @ value[0, head // groups]
    return out.transpose(1, 2)


def test_calibrate_matches_the_formula() -> None:
    torch.manual_seed(0)
    t, heads, kv, d = 12, 4, 2, 8
    scores = torch.randn(1, heads, t, t) * 2
    scores[..., 3] += 3.0  # a hidden sink at position 3
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    weights = scores.softmax(dim=-1)
    value = torch.randn(1, kv, t, d)
    output = (weights @ value.repeat_interleave(heads // kv, dim=1)).transpose(1, 2)
    state = ActState(heads=(0, 3), beta=0.4, threshold=0.1, min_queries=2)
    calibrated = calibrate(output, weights, value, state)
    assert torch.allclose(calibrated, _explicit(weights, value, state), atol=1e-5)
    assert torch.equal(calibrated[:, :, [1, 2]], output[:, :, [1, 2]])  # heads not chosen are untouched
    assert not torch.allclose(calibrated[:, :, 0], output[:, :, 0])
    assert torch.equal(calibrate(output, weights, value, dataclasses.replace(state, beta=1.0)), output)


def _logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids[None]).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_act_every_arch(arch: str, smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    loaded = tiny_model(arch, smollm2.tokenizer)
    ids = wikitext_stream.ids[:CTX]
    native = _logits(loaded, ids)
    session = _session(loaded, wikitext_stream.windows(CTX, [10, 11]))
    loose = {"threshold": 0.05, "min_queries": 4}  # random models spread attention: a lower bar finds sinks
    record = ActStep(ActConfig(beta=1.0, **loose)).apply(session)
    assert record["heads"] and record["calibration_windows"] == 2
    assert loaded.model.config._attn_implementation == ATTENTION_NAME
    assert torch.allclose(_logits(loaded, ids), native, atol=1e-5)  # beta = 1 is the identity

    step = ActStep(ActConfig(beta=0.4, **loose))
    applied = step.apply(session)
    assert applied["heads"] == record["heads"]
    calibrated = _logits(loaded, ids)
    assert not torch.allclose(calibrated, native, atol=1e-4)
    changed = ids.clone()
    changed[CTX // 2] = 5
    assert torch.equal(_logits(loaded, changed)[: CTX // 2], calibrated[: CTX // 2])  # causal

    fresh = tiny_model(arch, smollm2.tokenizer)
    step.restore(_session(fresh, session.calibration), applied)
    assert torch.equal(_logits(fresh, ids), calibrated)
    assert to_json(applied)  # the record is plain data


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_layers_without_chosen_heads_keep_the_base_core(arch: str, smollm2: LoadedModel,
                                                        wikitext_stream: TokenStream) -> None:
    """Layer 0 has no chosen head: it keeps the composing function's SDPA core; layer 1 runs eager + ACT on the
    SDPA-style mask turned additive (Gemma's sliding window included); with beta = 1 nothing changes."""
    loaded = tiny_model(arch, smollm2.tokenizer)
    ids = wikitext_stream.ids[:CTX]
    native = _logits(loaded, ids)
    attention = loaded.adapter.attention_modules(loaded.model)
    install(loaded.model, loaded.adapter, [[], [0, 2]], ActConfig(beta=1.0))
    assert not hasattr(attention[0], "_sinkquant_core") and attention[1]._sinkquant_core is act_attention
    assert attention[1]._sinkquant_act.heads == (0, 2)
    assert torch.allclose(_logits(loaded, ids), native, atol=1e-5)
    install(loaded.model, loaded.adapter, [[1], []], ActConfig(beta=0.2, threshold=0.05, min_queries=4))
    assert attention[0]._sinkquant_core is act_attention and not hasattr(attention[1], "_sinkquant_core")
    assert not torch.allclose(_logits(loaded, ids), native, atol=1e-4)


def test_act_composes_after_other_transforms(smollm2: LoadedModel, wikitext_stream: TokenStream) -> None:
    """A (query, key, value) transform installed by another step (here: values halved) runs before ACT's core,
    so ACT calibrates the attention the transformed model computes, and beta = 1 leaves that model as it was."""
    loaded = tiny_model("llama", smollm2.tokenizer)
    ids = wikitext_stream.ids[:CTX]
    add_transform(loaded.model, loaded.adapter, lambda index, module: lambda m, q, k, v: (q, k, 0.5 * v))
    transformed = _logits(loaded, ids)
    install(loaded.model, loaded.adapter, [[0, 1], [2]], ActConfig(beta=1.0))
    assert torch.allclose(_logits(loaded, ids), transformed, atol=1e-5)
    install(loaded.model, loaded.adapter, [[0, 1], [2]], ActConfig(beta=0.4, threshold=0.05, min_queries=4))
    assert not torch.allclose(_logits(loaded, ids), transformed, atol=1e-4)
    assert len(loaded.adapter.attention_modules(loaded.model)[0]._sinkquant_transforms) == 1


def test_additive_mask_from_sdpa_masks() -> None:
    query, key = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4)  # 3 queries after 2 cached keys
    causal = additive_mask(None, query, key)
    assert causal.shape == (1, 1, 3, 5)
    assert torch.equal(causal[0, 0] == 0, torch.ones(3, 5, dtype=torch.bool).tril(2))
    window = torch.ones(1, 1, 3, 5, dtype=torch.bool).tril(2).triu(1)
    assert torch.equal(additive_mask(window, query, key) == 0, window)
    float_mask = torch.zeros(1, 1, 3, 5)
    assert additive_mask(float_mask, query, key) is float_mask


def test_act_bad_config_and_record(smollm2: LoadedModel) -> None:
    for bad in ({"beta": 0.0}, {"beta": 1.5}, {"threshold": 1.0}, {"min_queries": 0}, {"betta": 0.4}):
        with pytest.raises(ValidationError):
            ActConfig(**bad)
    loaded = tiny_model("llama", smollm2.tokenizer)
    with pytest.raises(SinkquantError, match="layer 7; the model has 2 layers"):
        ActStep(ActConfig()).restore(_session(loaded, torch.zeros(0, CTX)), {"heads": [[7, 0]]})
    with pytest.raises(SinkquantError, match="act needs calibration windows"):
        ActStep(ActConfig()).apply(_session(loaded, torch.zeros(0, CTX, dtype=torch.long)))


@pytest.mark.long
@pytest.mark.slow
def test_act_on_smollm2(smollm2: LoadedModel, wikitext_stream: TokenStream, eval_and_calib) -> None:
    """Heads chosen on the calibration windows (the end of the text) only; perplexity on the first 8 windows."""
    torch.set_num_threads(1)
    plan, calib, fp32 = eval_and_calib(512, 8, 4)
    loaded = dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model))
    record = ActStep(ActConfig()).apply(_session(loaded, torch.cat(calib)))
    assert record["beta"] == 0.4 and record["threshold"] == 0.1 and record["calibration_windows"] == 4
    layers = {layer for layer, _ in record["heads"]}
    assert len(record["heads"]) >= 3 and min(layers) >= 1
    assert all(p["position"] > 0 for p in record["sink_positions"])
    calibrated = evaluate(loaded, wikitext_stream, plan, bos="never", progress=False).ppl
    assert abs(calibrated / fp32 - 1) < 0.05  # a calibration, not a new model: within 5% of fp32
    assert calibrated != fp32
