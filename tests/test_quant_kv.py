"""Simulated KV-cache quantization through transformers' attention interface, on every architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sinkquant.engine.apply import quantize_model
from sinkquant.quant import KeepPolicy, KVScheme, Scheme
from sinkquant.quant.attention import ATTENTION_NAME
from tests.tiny import ARCHS, tiny_model


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def _ids() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_kv_quant_runs_and_cache_matches_full_forward(arch: str, tokenizer) -> None:
    loaded = tiny_model(arch, tokenizer)
    ids = _ids()
    reference = loaded.model(input_ids=ids).logits
    quantize_model(loaded, Scheme(kv=KVScheme(bits=4, granularity="token")), keep=KeepPolicy(positions=(0,)))
    assert loaded.model.config._attn_implementation == ATTENTION_NAME
    full = loaded.model(input_ids=ids).logits
    assert not torch.allclose(full, reference)
    assert torch.equal(full[:, 0], reference[:, 0])  # token 0 sees only its own kept key/value
    # incremental decoding with a cache: same masks, same (per-token) quantization, same logits
    cache = DynamicCache(config=loaded.model.config)
    loaded.model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True)
    tail = loaded.model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(tail, full[:, 12:], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_kv_per_head_keep_reduces_error(tokenizer) -> None:
    """A huge key at position 0 (a sink) stretches the per-head range unless that position is kept."""
    errors = {}
    for label, keep in (("plain", KeepPolicy()), ("keep0", KeepPolicy(positions=(0,)))):
        loaded = tiny_model("llama", tokenizer)
        ids = _ids()
        ids[:, 0] = 1000  # a token id used nowhere else
        # Only token 1000 carries channel 0, and layer 0 reads channel 0 into huge keys and values: a sink.
        embed = loaded.model.get_input_embeddings().weight
        embed[:, 0] = 0.0
        embed[1000] = 0.0
        embed[1000, 0] = 1.0
        attention = loaded.model.model.layers[0].self_attn
        attention.k_proj.weight[:, 0] *= 100.0
        attention.v_proj.weight[:, 0] *= 100.0
        reference = loaded.model(input_ids=ids).logits
        quantize_model(loaded, Scheme(kv=KVScheme(bits=4, granularity="head")), keep=keep)
        errors[label] = float((loaded.model(input_ids=ids).logits - reference)[:, 1:].abs().mean())
    assert errors["keep0"] < errors["plain"] / 2
