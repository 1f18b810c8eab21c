"""The int8 KV cache stores integers, serves the simulator's dequantized states, and works with generate and a
precomputed fp prefix."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors import safe_open
from transformers import DynamicCache

from sinkquant.adapters import adapter_for
from sinkquant.backends.kv_cache import Int8KVCache
from sinkquant.backends.native import NativeLinear, convert_to_native
from sinkquant.engine import load, save
from sinkquant.engine.apply import apply_recipe, quantize_session
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import build_prefix, evaluate
from sinkquant.quant.keep import attach_keep_state, keep_state
from sinkquant.quant.kv import enable_kv_quant
from sinkquant.quant.scheme import ActivationScheme, KeepPolicy, KVScheme, Scheme, WeightScheme
from sinkquant.recipe import parse_recipe
from sinkquant.steps.session import Session
from tests.bounds import rounding_bound
from tests.tiny import tiny_model

SPEC = KVScheme(bits=8, granularity="token", symmetric=False)


def _simulated(model: torch.nn.Module, policy: KeepPolicy) -> torch.nn.Module:
    sim = copy.deepcopy(model)
    state = attach_keep_state(sim, adapter_for(sim), policy)
    enable_kv_quant(sim, adapter_for(sim), SPEC, state)
    return sim


def _native(model: torch.nn.Module, policy: KeepPolicy):
    native = copy.deepcopy(model)
    return native, attach_keep_state(native, adapter_for(native), policy)


@pytest.fixture(scope="module")
def tiny_llama(smollm2):
    return tiny_model("llama", smollm2.tokenizer)


def test_tiny_prefill_and_decode_match_simulated_kv(tiny_llama) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 24))
    policy = KeepPolicy(positions=(0,), token_ids=(ids[1, 5].item(),))  # a per-row kept token too
    sim = _simulated(tiny_llama.model, policy)
    native, state = _native(tiny_llama.model, policy)
    cache = Int8KVCache(native.config, SPEC, keep=state)
    with torch.no_grad():
        expected = sim(input_ids=ids, use_cache=False).logits
        prefill = native(input_ids=ids[:, :16], past_key_values=cache, use_cache=True).logits
        steps = [native(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                 for t in range(16, 24)]
    got = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    layer = cache.layers[0]
    assert layer.stored["q_keys"].dtype == torch.uint8 and layer.stored["q_keys"].shape[2] == 24
    assert layer.kept_keys.shape[2] == 2 and bool(layer.kept_mask[1].all()) and not bool(layer.kept_mask[0, 1])
    with torch.no_grad():  # the int8 states really are quantized: the fp cache differs
        fp = tiny_llama.model(input_ids=ids, use_cache=False).logits
    assert (fp - expected).abs().max() > 1e-4


def test_memory_is_about_a_quarter_of_fp32(smollm2, wikitext_stream) -> None:
    ids = wikitext_stream.ids[:64][None]
    cache, fp_cache = Int8KVCache(smollm2.model.config, SPEC), DynamicCache()
    with torch.no_grad():
        smollm2.model(input_ids=ids, past_key_values=cache, use_cache=True)
        smollm2.model(input_ids=ids, past_key_values=fp_cache, use_cache=True)
    fp_bytes = sum(t.numel() * t.element_size() for layer in fp_cache.layers for t in (layer.keys, layer.values))
    ratio = cache.nbytes() / fp_bytes
    assert ratio == pytest.approx((64 + 4 + 1) / (64 * 4)), ratio  # per 64-wide head: int8s, fp32 scale, 8-bit zero


def test_smollm2_with_fp_prefix_matches_simulated_kv_and_generates(smollm2, wikitext_stream) -> None:
    """BOS as a precomputed fp prefix (position 0 kept), then int8 KV for everything after it."""
    prefix = build_prefix(smollm2.model, [smollm2.bos_id])
    policy = KeepPolicy(positions=(0,))
    sim = _simulated(smollm2.model, policy)
    native, state = _native(smollm2.model, policy)
    ids = wikitext_stream.ids[:48][None]
    with torch.no_grad():
        expected = sim(input_ids=ids, past_key_values=prefix.cache_for_batch(1), use_cache=True).logits
        got = native(input_ids=ids, past_key_values=Int8KVCache(native.config, SPEC, state, prefix),
                     use_cache=True).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    full = torch.cat([torch.tensor([prefix.ids]), prompt], dim=1)  # generate slices off the cached prefix itself
    with torch.no_grad():
        reference = sim.generate(full, past_key_values=prefix.cache_for_batch(1), max_new_tokens=8, do_sample=False)
        cache = Int8KVCache(native.config, SPEC, state, prefix)
        out = native.generate(full, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, full.shape[1] + 8)
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == full.shape[1] + 7  # the last generated token is never fed back


def test_bad_input_is_refused(smollm2, tiny_llama) -> None:
    with pytest.raises(SinkquantError, match="granularity 'token', bits 8"):
        Int8KVCache(tiny_llama.model.config, KVScheme(bits=8, granularity="head"))
    with pytest.raises(SinkquantError, match="sliding-window"):
        Int8KVCache(tiny_model("gemma3", smollm2.tokenizer).model.config, SPEC)
    tiny_prefix = build_prefix(tiny_llama.model, [1])
    with pytest.raises(SinkquantError, match="prefix KV has 2 layers"):
        Int8KVCache(smollm2.model.config, SPEC, prefix=tiny_prefix)


@pytest.mark.parametrize("mode", ["static", "dynamic-token"])
def test_native_w8a8_int8_kv_and_prefix_like_the_simulator(smollm2, wikitext_stream, eval_and_calib, mode) -> None:
    """Everything real at once: integer Linear layers, int8 KV, BOS as an fp prefix, then generate. Every layer
    is exact to float rounding (tests/test_native.py), but a rounded activation within float rounding of a grid
    boundary may land one level apart and the model amplifies it: the logits must agree within the
    simulator's own float32-vs-float64 spread (twice it, plus 1e-3)."""
    _, calib, _ = eval_and_calib(128, 2, 1)
    prefix = build_prefix(smollm2.model, [smollm2.bos_id])
    scheme = Scheme(weights=WeightScheme(bits=8, granularity="channel"),
                    activations=ActivationScheme(bits=8, mode=mode), kv=SPEC)
    target = dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model))
    # Calibrate behind the fp prefix, as the prefix step does: the session's batches carry its KV.
    session = Session(loaded=target, scheme=scheme, calibration=torch.cat(calib), prefix=prefix,
                      keep=KeepPolicy(positions=(0,)), progress=False)
    quantize_session(session)
    sim = target.model
    native = copy.deepcopy(sim)
    convert_to_native(native)
    native.set_attn_implementation("sdpa")  # the int8 cache now holds the quantized KV, not the attention
    ids = wikitext_stream.ids[:32][None]

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).abs().max() / b.abs().max())

    with torch.no_grad():
        expected = sim(input_ids=ids, past_key_values=prefix.cache_for_batch(1), use_cache=True).logits
        spread = relative(copy.deepcopy(sim).double()(input_ids=ids, past_key_values=prefix.cache_for_batch(1),
                                                      use_cache=True).logits, expected)
        cache = Int8KVCache(native.config, SPEC, keep_state(native), prefix)
        got = native(input_ids=ids, past_key_values=cache, use_cache=True).logits
    assert relative(got, expected) < 2 * spread + 1e-3, (relative(got, expected), spread)
    assert cache.layers[0].stored["q_keys"].dtype == torch.uint8
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    full = torch.cat([torch.tensor([prefix.ids]), prompt], dim=1)
    with torch.no_grad():
        cache = Int8KVCache(native.config, SPEC, keep_state(native), prefix)
        out = native.generate(full, past_key_values=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, full.shape[1] + 8) and torch.equal(out[:, : full.shape[1]], full)
    assert cache.get_seq_length() == full.shape[1] + 7


def test_native_recipe_with_kv_evaluates_generates_and_reloads(smollm2, wikitext_stream, eval_and_calib,
                                                               tmp_path) -> None:
    """backend native + scheme.kv through the engine: evaluation and generate run on an Int8KVCache seeded with
    the fp prefix (no simulated KV transform left), perplexity as the simulated recipe's (the same bound as
    tests/test_native.py: 0.3% plus tests/bounds.py's multiple of that spread), and the artifact reloads to the
    same numbers with 16-bit embeddings on disk."""
    plan, _, _ = eval_and_calib(64, 8, 1)
    data = {"name": "kv", "description": "d", "steps": [{"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}],
            "scheme": {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "dynamic-token"},
                       "kv": {"bits": 8, "granularity": "token"}, "embeddings": {"dtype": "float16"}},
            "calibration": {"windows": 1}}
    simulated = apply_recipe(smollm2, parse_recipe(data), wikitext_stream, ctx=64, copy=True)
    native = apply_recipe(smollm2, parse_recipe({**data, "backend": "native"}), wikitext_stream, ctx=64, copy=True)
    cache = native.cache_for_batch(2)
    assert isinstance(cache, Int8KVCache) and cache.get_seq_length() == len(native.prefix.ids) == 1
    assert not any(getattr(a, "_sinkquant_transforms", ()) for a in adapter_for(native.model)
                   .attention_modules(native.model))
    embedding = native.model.get_input_embeddings().weight
    assert torch.equal(embedding, embedding.half().float())
    sim_ppl = simulated.evaluate(wikitext_stream, plan, progress=False).ppl
    native_ppl = native.evaluate(wikitext_stream, plan, progress=False).ppl
    sim64_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", prefix=simulated.prefix, progress=False,
                         model=copy.deepcopy(simulated.model).double()).ppl
    print(f"native kv: simulated {sim_ppl:.4f} native {native_ppl:.4f} simulated float64 {sim64_ppl:.4f}")
    assert abs(native_ppl / sim_ppl - 1) < rounding_bound(3e-3, sim_ppl, sim64_ppl)
    text = native.generate("The capital of France is", max_new_tokens=5)
    assert isinstance(text, str) and text.strip()
    folder = save(native, tmp_path / "artifact")
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert handle.get_tensor("model.layers.0.mlp.up_proj.weight_int").dtype == torch.int8
    reloaded = load(folder)
    assert isinstance(reloaded.model.model.layers[0].mlp.up_proj, NativeLinear)
    assert reloaded.evaluate(wikitext_stream, plan, progress=False).ppl == pytest.approx(native_ppl, rel=1e-6)

