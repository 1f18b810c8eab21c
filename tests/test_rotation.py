"""Rotation is exact: on tiny random models of every supported architecture the rotated model's logits match
the original's in fp32, with the Q/K rotation running inside the attention and after a save / restore."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from sinkquant.adapters import normalize
from sinkquant.errors import SinkquantError
from sinkquant.quant.rotation import RotationRecord, restore_rotation, rotate, rotate_qk
from tests.tiny import ARCHS, tiny_config, tiny_model

ROTATING_ATTENTION = "sinkquant_test_rotate_qk"
CALLS = {"rotated": 0}


def _rotating_attention(module, query, key, value, attention_mask, **kwargs):
    """What the KV-quantizing attention does: rotate Q and K after RoPE, then attend."""
    rotated_query, rotated_key = rotate_qk(module, query, key)
    if rotated_query is not query:
        CALLS["rotated"] += 1
        assert not torch.allclose(rotated_key, key)
    return sdpa_attention_forward(module, rotated_query, rotated_key, value, attention_mask, **kwargs)


AttentionInterface.register(ROTATING_ATTENTION, _rotating_attention)
AttentionMaskInterface.register(ROTATING_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _perturbed(arch: str):
    """A tiny model whose norms carry non-trivial weights and biases (so folding them matters) and whose
    embeddings carry one massive channel, like a sink."""
    loaded = tiny_model(arch, tokenizer=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in loaded.model.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))
        loaded.model.get_input_embeddings().weight[:, 5] += 3.0
    return loaded


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_rotation_is_exact_on_every_architecture(arch):
    loaded = _perturbed(arch)
    ids = torch.randint(3, 4000, (2, 24), generator=torch.Generator().manual_seed(2))
    reference = _logits(loaded.model, ids)
    with torch.no_grad():
        hidden_before = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    rotated = copy.deepcopy(loaded.model)
    record = rotate(rotated, seed=7)
    assert record.residual == 64 and record.qk == 16 and record.value_output == 16
    assert record.residual_kind == "hadamard sylvester(1) x sylvester(64)"
    rotated.set_attn_implementation(ROTATING_ATTENTION)
    calls = CALLS["rotated"]
    logits = _logits(rotated, ids)
    assert CALLS["rotated"] == calls + 2  # both layers rotated Q/K inside the attention
    assert float(reference.std()) > 0.1
    assert float((logits - reference).abs().max()) < 1e-3
    # The residual stream really is rotated (the logits match for the right reason).
    with torch.no_grad():
        hidden_after = rotated(input_ids=ids, output_hidden_states=True).hidden_states[1]
    assert float((hidden_after - hidden_before).abs().max()) > 0.1

    # Save the rotated weights and config, rebuild, restore the online transforms: same logits.
    fresh = normalize(AutoModelForCausalLM.from_config(copy.deepcopy(rotated.config), dtype=torch.float32)).eval()
    restore_rotation(fresh, record.to_dict())
    fresh.load_state_dict(rotated.state_dict(), strict=True)
    fresh.set_attn_implementation(ROTATING_ATTENTION)
    assert torch.allclose(_logits(fresh, ids), logits, atol=1e-5, rtol=0)


def test_rotation_without_online_transforms_is_not_equivalent():
    """The down_proj online rotation is needed: a fresh model holding the rotated weights but no restore is off."""
    loaded = _perturbed("llama")
    with torch.no_grad():
        for down in loaded.model.model.layers:
            down.mlp.down_proj.weight.mul_(10)  # make the MLP's share of the logits visible
    ids = torch.randint(3, 4000, (1, 16), generator=torch.Generator().manual_seed(3))
    reference = _logits(loaded.model, ids)
    record = rotate(loaded.model, seed=0)
    fresh = normalize(AutoModelForCausalLM.from_config(loaded.model.config, dtype=torch.float32)).eval()
    fresh.load_state_dict(loaded.model.state_dict(), strict=True)
    assert float((_logits(fresh, ids) - reference).abs().max()) > 1e-2
    restore_rotation(fresh, record)
    assert float((_logits(fresh, ids) - reference).abs().max()) < 1e-3


def test_rotation_spreads_the_sink_channel():
    loaded = _perturbed("llama")
    before = loaded.model.get_input_embeddings().weight.detach().clone()
    ratio_before = float((before.abs().amax(dim=1) / before.pow(2).mean(dim=1).sqrt()).mean())
    rotate(loaded.model, seed=0)
    after = loaded.model.get_input_embeddings().weight.detach()
    ratio_after = float((after.abs().amax(dim=1) / after.pow(2).mean(dim=1).sqrt()).mean())
    assert ratio_after < 0.5 * ratio_before


def test_rotate_qk_leaves_scores_unchanged_and_passes_unrotated_modules():
    loaded = tiny_model("llama", tokenizer=None)
    rotate(loaded.model, seed=0, residual=False, value_output=False, down_proj=False)
    attention = loaded.adapter.attention_modules(loaded.model)[0]
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    rq, rk = rotate_qk(attention, q, k)
    assert not torch.allclose(rq, q)
    assert torch.allclose(rq[:, :2] @ rk.transpose(-1, -2), q[:, :2] @ k.transpose(-1, -2), atol=1e-5)
    plain = torch.nn.Module()
    assert rotate_qk(plain, q, k) == (q, k)


def test_unsupported_requests_are_sinkquant_errors():
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    from sinkquant.models import random_model

    post_ln = random_model(config, None, spec="tiny-opt-post-ln")
    with pytest.raises(SinkquantError, match="do_layer_norm_before"):
        rotate(post_ln)
    half = tiny_model("llama", tokenizer=None)
    half.model.to(torch.bfloat16)
    with pytest.raises(SinkquantError, match="fp32"):
        rotate(half)
    with pytest.raises(SinkquantError, match="rotation record"):
        RotationRecord.from_dict({"seed": 0})


def test_rotating_smollm2_is_exact_and_tames_its_massive_activation(smollm2, wikitext_stream):
    """The real model: 576 = 36 * 16 (Paley II) residual, 1536 = 12 * 128 (Paley I) online down_proj rotation."""
    ids = wikitext_stream.windows(128, [0])
    down = "model.layers.11.mlp.down_proj"  # where the sink's massive activation enters (x418 absmax / rms)

    def run(model):
        captured = []
        handle = model.get_submodule(down).register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
        try:
            logits = _logits(model, ids)
        finally:
            handle.remove()
        x = captured[0]
        return logits, float(x.abs().max() / x.pow(2).mean().sqrt())

    reference, peak_before = run(smollm2.model)
    rotated = copy.deepcopy(smollm2.model)
    record = rotate(rotated, seed=0)
    assert record.residual_kind == "hadamard paley2(17) x sylvester(16)"
    assert record.down_proj_kind == "hadamard paley1(11) x sylvester(128)"
    logits, peak_after = run(rotated)
    assert float((logits - reference).abs().max()) < 1e-3 * float(reference.abs().max())
    assert peak_before > 100 and peak_after < peak_before / 10


def test_a_deep_copy_carries_its_own_online_transforms():
    loaded = _perturbed("gemma3")
    rotate(loaded.model, seed=0)
    twin = copy.deepcopy(loaded.model)
    down = loaded.adapter.decoder_layers(twin)[0].get_submodule(loaded.adapter.down_proj)
    ids = torch.randint(3, 4000, (1, 12), generator=torch.Generator().manual_seed(4))
    before = _logits(twin, ids)
    with torch.no_grad():
        down.input_rotation.matrix.zero_()  # breaks the copy only
    assert not torch.allclose(_logits(twin, ids), before)
    assert torch.allclose(_logits(loaded.model, ids), before)
