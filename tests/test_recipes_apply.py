"""Recipes applied to the real SmolLM2 (short windows) and to tiny models of every architecture."""

from __future__ import annotations

import pytest
import torch

from sinkquant.data import TokenStream, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import evaluate
from sinkquant.recipes import apply_recipe, load_recipe, parse_recipe
from sinkquant.recipes.artifact import load, save
from sinkquant.recipes.prefix import greedy_prefix, max_linear_input, token_id, with_bos
from tests.tiny import ARCHS, tiny_model

CTX = 128
W8A8 = {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}}


@pytest.fixture(scope="module")
def plan(wikitext_stream):
    return plan_windows(wikitext_stream, CTX, max_windows=3, calib_windows=8)


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, wikitext_stream, plan) -> float:
    return evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False).ppl


def _ppl(smollm2, stream, plan, name: str):
    quantized = apply_recipe(smollm2, load_recipe(f"recipes/{name}.yaml"), stream, ctx=CTX)
    return quantized, quantized.evaluate(stream, plan, bos="never", progress=False)


def test_mitigations_beat_naive_static(smollm2, wikitext_stream, plan, fp32_ppl) -> None:
    _, naive = _ppl(smollm2, wikitext_stream, plan, "w8a8-naive")
    _, keep = _ppl(smollm2, wikitext_stream, plan, "w8a8-keep-sink")
    quantized, best = _ppl(smollm2, wikitext_stream, plan, "w8a8-prefix-smooth-except")
    assert naive.ppl > 1.3 * fp32_ppl
    assert keep.ppl < naive.ppl
    assert best.ppl < keep.ppl
    assert best.tokens == naive.tokens  # the prefix conditions, it is never scored
    assert best.context_cached and best.context_ids == quantized.prefix.ids
    assert quantized.prefix.ids[0] == smollm2.bos_id and quantized.prefix.ids.count(smollm2.bos_id) == 1


def test_artifact_round_trip(smollm2, wikitext_stream, plan, tmp_path) -> None:
    quantized, before = _ppl(smollm2, wikitext_stream, plan, "w8a8-prefix-smooth-except")
    assert len(quantized.record["exceptions"]) == 8
    folder = save(quantized, tmp_path / "artifact")
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "prefix.safetensors", "recipe.yaml", "sinkquant.json", "config.json"} <= names
    reloaded = load(folder)
    after = reloaded.evaluate(wikitext_stream, plan, bos="never", progress=False)
    assert after.ppl == pytest.approx(before.ppl, rel=1e-6)
    assert reloaded.prefix.ids == quantized.prefix.ids
    assert reloaded.recipe == quantized.recipe
    for name in quantized.record["exceptions"]:  # per-layer exceptions survive the reload
        assert reloaded.model.get_submodule(name).activations is None
    text = reloaded.generate("The capital of France is", max_new_tokens=5)
    assert isinstance(text, str) and text.strip()
    with pytest.raises(SinkquantError, match="already exists"):
        save(quantized, folder)


def test_load_refuses_a_non_artifact(tmp_path) -> None:
    with pytest.raises(SinkquantError, match="not a sinkquant artifact"):
        load(tmp_path)


def test_greedy_prefix_lowers_the_peak(smollm2, wikitext_stream) -> None:
    sample = wikitext_stream.windows(CTX, [100, 101])
    ids, trace = greedy_prefix(smollm2, sample, max_tokens=3, bos_mode="auto")
    assert ids[0] == smollm2.bos_id
    peaks = [step["max_linear_input"] for step in trace]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0]


def test_prefix_token_rules(smollm2) -> None:
    newline = token_id(smollm2, "\n", "prefix.tokens[0]")
    assert with_bos(smollm2, [smollm2.bos_id, newline], "auto") == [smollm2.bos_id, newline]
    assert with_bos(smollm2, [newline], "never") == [newline]
    with pytest.raises(SinkquantError, match=r"prefix.tokens\[1\]: 'hello world' is 2 tokens"):
        token_id(smollm2, "hello world", "prefix.tokens[1]")
    with pytest.raises(SinkquantError, match="outside the vocabulary"):
        token_id(smollm2, 10**7, "prefix.tokens[0]")


@pytest.mark.parametrize("arch", ARCHS)
def test_max_linear_input_skips_the_prefix_tokens(arch, smollm2) -> None:
    """The greedy prefix score counts only the tokens after the prefix, also where a model (OPT's MLP)
    flattens batch and tokens before its Linear layers."""
    loaded = tiny_model(arch, smollm2.tokenizer)
    torch.manual_seed(1)
    ids = torch.randint(3, 5000, (1, 24))
    # The prefix token is a one-channel spike, so the prefix positions hold the largest Linear inputs.
    ids[0, :3] = 7
    with torch.no_grad():
        embedding = loaded.model.get_input_embeddings().weight
        embedding[7] = 0.0
        embedding[7, 10] = 100.0
    token_max: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: token_max.append(
        args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=-1))) for m in
        loaded.adapter.linear_layers(loaded.model).values()]
    with torch.no_grad():
        loaded.model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    per_position = torch.stack(token_max).amax(dim=0)
    assert per_position[:3].max() > per_position[3:].max()
    peak = max_linear_input(loaded, loaded.model, ids[0, :3].tolist(), ids[:, 3:])
    assert peak == pytest.approx(float(per_position[3:].max()), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_step_runs_on_every_architecture(arch, smollm2) -> None:
    loaded = tiny_model(arch, smollm2.tokenizer)
    torch.manual_seed(0)
    stream = TokenStream(ids=torch.randint(3, 5000, (64 * 12,)), text_sha256="random", source={})
    recipe = parse_recipe({
        "name": "all-steps", "description": "every step at once on a tiny model",
        "steps": [{"prefix": {"tokens": ["\n", "."]}}, {"smooth": {"alpha": 0.5}}, {"keep_sink": {}},
                  {"exceptions": {"top": 2}}, {"clip": {"grid": 4, "samples": 32}}],
        "scheme": {**W8A8, "kv": {"bits": 8}}, "calibration": {"windows": 2},
    })
    quantized = apply_recipe(loaded, recipe, stream, ctx=64)
    plan = plan_windows(stream, 64, max_windows=2, calib_windows=2)
    result = quantized.evaluate(stream, plan, bos="never", progress=False)
    assert torch.isfinite(torch.tensor(result.ppl))
    assert quantized.record["quantized_layers"] == len(loaded.adapter.linear_layers(loaded.model))
    assert 0.0 < quantized.record["clip"]["mean_ratio"] <= 1.0
    assert len(quantized.record["exceptions"]) == 2
    assert all(quantized.model.get_submodule(n).activations is None for n in quantized.record["exceptions"])
    assert not set(quantized.record["exceptions"]) & set(quantized.record["clip"]["ratios"])
