"""The adapter finds layers, attention and Linear inputs on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sinkquant.adapters import SUPPORTED_MODEL_TYPES, adapter_for
from sinkquant.errors import SinkquantError
from tests.tiny import ARCHS, tiny_config, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_locates_modules(arch: str) -> None:
    loaded = tiny_model(arch, tokenizer=None)
    adapter = loaded.adapter
    config = loaded.model.config
    layers = adapter.decoder_layers(loaded.model)
    assert len(layers) == config.num_hidden_layers
    assert len(adapter.attention_modules(loaded.model)) == config.num_hidden_layers
    linears = adapter.linear_layers(loaded.model)
    assert len(linears) == len(adapter.linears) * config.num_hidden_layers
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert loaded.model.get_output_embeddings() not in linears.values()
    for norm, targets in adapter.smooth_groups:
        width = layers[0].get_submodule(norm).weight.shape[0]
        assert all(layers[0].get_submodule(t).in_features == width for t in targets)
    assert adapter.final_norm_module(loaded.model) is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_normalized_model_computes_the_same(arch: str) -> None:
    """Conv1D -> Linear conversion (GPT-2) must not change the function; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    converted = tiny_model(arch, tokenizer=None).model
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_unknown_architecture_is_a_clear_error() -> None:
    class Config:
        model_type = "mamba"

    with pytest.raises(SinkquantError, match="unsupported architecture model_type='mamba'; supported: llama"):
        adapter_for(Config())
    assert "gpt_neox" in SUPPORTED_MODEL_TYPES
