"""The evaluator against an independent computation (transformers' own loss) on the real SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch

from sinkquant.data import TokenStream, plan_windows
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import Prefix, build_prefix, evaluate

CTX = 128


@pytest.fixture(scope="module")
def plan(wikitext_stream: TokenStream):
    return plan_windows(wikitext_stream, CTX, max_windows=3)


def test_matches_transformers_loss(smollm2, wikitext_stream, plan) -> None:
    result = evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False)
    windows = wikitext_stream.windows(CTX, list(plan.eval_windows))
    with torch.no_grad():
        losses = [smollm2.model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert result.tokens == 3 * (CTX - 1)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(result.nll_sum / (result.bytes * math.log(2)))
    assert result.word_perplexity > result.ppl  # fewer words than tokens
    assert result.data["sha256"] == wikitext_stream.text_sha256
    assert result.versions["transformers"]
    assert result.bos == "never" and result.context_ids == []


def test_bos_policies_score_the_same_tokens(smollm2, wikitext_stream, plan) -> None:
    never = evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False)
    per_window = evaluate(smollm2, wikitext_stream, plan, bos="per-window", progress=False)
    auto = evaluate(smollm2, wikitext_stream, plan, bos="auto", progress=False)
    assert per_window.tokens == never.tokens
    assert per_window.context_ids == [smollm2.bos_id]
    assert per_window.ppl != pytest.approx(never.ppl, rel=1e-3)
    assert auto.bos == ("per-window" if smollm2.adds_bos else "never")


def test_cached_prefix_equals_plain_context(smollm2, wikitext_stream, plan) -> None:
    """A precomputed prefix KV must give what the same tokens as plain context give, with no duplicate BOS."""
    ids = [smollm2.bos_id, 198, 30]
    plain = evaluate(smollm2, wikitext_stream, plan, prefix=Prefix(ids=ids), progress=False)
    cached = evaluate(smollm2, wikitext_stream, plan, bos="per-window", prefix=build_prefix(smollm2.model, ids),
                      progress=False, batch_size=2)
    assert cached.context_cached and not plain.context_cached
    assert cached.ppl == pytest.approx(plain.ppl, rel=1e-4)
    assert cached.tokens == plain.tokens


def test_prefix_without_bos_is_refused_under_per_window(smollm2, wikitext_stream, plan) -> None:
    with pytest.raises(SinkquantError, match="prefix does not start with it"):
        evaluate(smollm2, wikitext_stream, plan, bos="per-window", prefix=Prefix(ids=[198]), progress=False)


def test_ctx_above_model_limit(smollm2) -> None:
    stream = TokenStream(ids=torch.zeros(20000, dtype=torch.long), text_sha256="x", source={})
    plan = plan_windows(stream, 8192)
    with pytest.raises(SinkquantError, match="exceeds the model's limit of 8192 positions; use --ctx 8191"):
        evaluate(smollm2, stream, plan, bos="per-window", progress=False)


def test_batching_does_not_change_the_result(smollm2, wikitext_stream, plan) -> None:
    one = evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False)
    three = evaluate(smollm2, wikitext_stream, plan, bos="never", progress=False, batch_size=3)
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_fresh_prefix_cache_shares_tensors_but_never_changes_the_prefix(smollm2, arch) -> None:
    """cache_for_batch shares the prefix KV tensors instead of copying them; a forward must still leave the
    prefix as built, so a second forward from a fresh cache gives the same logits (sliding layers included)."""
    from tests.tiny import tiny_model

    model = tiny_model(arch, smollm2.tokenizer).model
    prefix = build_prefix(model, [1, 2, 3])
    built = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.cache.layers]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        first = model(input_ids=ids, past_key_values=prefix.cache_for_batch(1), use_cache=True).logits
        batched = model(input_ids=ids.repeat(2, 1), past_key_values=prefix.cache_for_batch(2), use_cache=True).logits
        second = model(input_ids=ids, past_key_values=prefix.cache_for_batch(1), use_cache=True).logits
    assert prefix.cache_for_batch(1).layers[0].keys is prefix.cache.layers[0].keys
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(prefix.cache.layers, built, strict=True))
    assert torch.equal(first, second) and torch.allclose(batched[1:], first, atol=1e-6)


def test_a_bf16_head_under_fp32_layers_scores_in_fp32(smollm2, wikitext_stream) -> None:
    """A streamed bf16 checkpoint keeps lm_head in bf16 and casts its input to bf16 (engine.stream.open_checkpoint);
    next_token_nll scores it from the fp32 hidden states with the head widened a vocabulary slice at a time: the
    result of an fp32 model whose head holds the same (bf16) values."""
    from sinkquant.perplexity import next_token_nll
    from tests.tiny import tiny_model

    reference = tiny_model("llama", smollm2.tokenizer).model
    head = reference.get_output_embeddings()
    head.weight.data = (head.weight.data * 50).to(torch.bfloat16).float()  # bf16 values, logits large enough
    # that scoring bf16-rounded inputs in bf16 would be off by ~5e-5 of the sum
    streamed = tiny_model("llama", smollm2.tokenizer).model
    streamed.load_state_dict(reference.state_dict())
    narrow = streamed.get_output_embeddings()
    narrow.weight.data = narrow.weight.data.to(torch.bfloat16)
    narrow.register_forward_pre_hook(lambda _m, args: (args[0].to(torch.bfloat16),))
    ids = wikitext_stream.windows(48, [0, 1])
    expected, count = next_token_nll(reference, ids, start=0)
    got, same_count = next_token_nll(streamed, ids, start=0)
    assert same_count == count and got == pytest.approx(expected, rel=1e-6)
