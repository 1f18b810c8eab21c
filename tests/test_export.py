"""compressed-tensors export: transformers (through the real compressed-tensors package) loads the folder and
computes what the native backend computes; the fp prefix KV travels beside it; what the format cannot express
is refused before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sinkquant.adapters import adapter_for
from sinkquant.backends.export import PREFIX_KV, export_compressed_tensors, load_prefix_cache
from sinkquant.backends.native import NativeLinear, native_from_simulated
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import Prefix, build_prefix, evaluate
from sinkquant.quant.scheme import ActivationSpec, KeepPolicy, QuantScheme, WeightSpec
from sinkquant.quant.simulate import quantize_model


def _native(smollm2, scheme: QuantScheme, calib) -> torch.nn.Module:
    model = copy.deepcopy(smollm2.model)
    quantize_model(model, adapter_for(smollm2.model), scheme, calib)
    native_from_simulated(model, smollm2.model)
    return model


def test_w8a8_static_with_prefix_round_trips(smollm2, wikitext_stream, eval_and_calib, tmp_path) -> None:
    """BOS as an fp prefix (its position kept, so calibration never sees it), static per-tensor W8A8."""
    plan, calib, _ = eval_and_calib(128, 2, 1)
    prefix = build_prefix(smollm2.model, [smollm2.bos_id])
    batches = [{"input_ids": c, "past_key_values": prefix.cache_for_batch(1), "use_cache": True} for c in calib]
    scheme = QuantScheme(weights=WeightSpec(8, "channel"), activations=ActivationSpec(8, "static", symmetric=False),
                         keep=KeepPolicy(positions=(0,)))
    native = _native(smollm2, scheme, batches)
    # An exception (weight-only) layer and a layer left in fp, as recipes produce them.
    exception, fp_layer = "model.layers.5.mlp.down_proj", "model.layers.6.mlp.down_proj"
    native.model.layers[5].mlp.down_proj = NativeLinear(native.get_submodule(exception).quantized_weight())
    native.model.layers[6].mlp.down_proj = copy.deepcopy(smollm2.model.get_submodule(fp_layer))
    out = export_compressed_tensors(native, smollm2.tokenizer, tmp_path / "w8a8", prefix=prefix)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group, weight_only = config["config_groups"]["group_0"], config["config_groups"]["group_1"]
    assert config["quant_method"] == "compressed-tensors" and group["format"] == "int-quantized"
    assert group["input_activations"]["strategy"] == "tensor" and not group["input_activations"]["dynamic"]
    assert weight_only["input_activations"] is None and len(weight_only["targets"]) == 1
    assert "lm_head" in config["ignore"] and fp_layer in config["ignore"]
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        name = "model.layers.0.mlp.down_proj"
        assert handle.get_tensor(f"{name}.weight").dtype == torch.int8
        assert handle.get_tensor(f"{name}.input_zero_point").dtype == torch.int8
        torch.testing.assert_close(handle.get_tensor(f"{name}.input_scale").reshape(()),
                                   native.get_submodule(name).act_scale.reshape(()))

    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids, cache = load_prefix_cache(out, loaded.config)
    assert ids == [smollm2.bos_id]
    sidecar = Prefix(ids=ids, cache=cache)
    exported_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=sidecar, model=loaded, progress=False).ppl
    native_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=prefix, model=native, progress=False).ppl
    # Rounded activations: a value within float rounding of a grid boundary may land one level apart and the
    # model amplifies it, so the bound adds the native model's own float32-vs-float64 spread (same math).
    native64_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=prefix, model=copy.deepcopy(native).double(),
                            progress=False).ppl
    tolerance = 5e-3 + 2 * abs(native64_ppl / native_ppl - 1)
    assert abs(exported_ppl / native_ppl - 1) < tolerance, (exported_ppl, native_ppl, native64_ppl)
    # Layer level (the first forward decompressed the weights): the same numbers to float rounding,
    # compressed-tensors rounding the activations itself.
    x = torch.randn(1, 128, 1536) * 3  # the shape of the last forward, whose keep mask (none kept) is current
    with torch.no_grad():
        a, b = loaded.get_submodule(name)(x), native.get_submodule(name)(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    without = evaluate(smollm2, wikitext_stream, plan, bos="never", model=loaded, progress=False).ppl
    assert without > exported_ppl  # the prefix is worth something: without it the sink row sets no scale here


def test_w4a16_group_round_trips_exactly(smollm2, wikitext_stream, eval_and_calib, tmp_path) -> None:
    plan, _, _ = eval_and_calib(128, 2, 1)
    native = _native(smollm2, QuantScheme(weights=WeightSpec(4, "group", 64, symmetric=True)), None)
    out = export_compressed_tensors(native, smollm2.tokenizer, tmp_path / "w4a16")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["weights"]["group_size"] == 64
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.up_proj.weight_packed").dtype == torch.int32
    assert not (out / PREFIX_KV).exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    exported_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", model=loaded, progress=False).ppl
    torch.testing.assert_close(loaded.model.layers[3].mlp.down_proj.weight,  # decompressed by the first forward
                               native.model.layers[3].mlp.down_proj.quantized_weight().dequantize(), rtol=0, atol=0)
    native_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", model=native, progress=False).ppl
    assert abs(exported_ppl / native_ppl - 1) < 1e-4


@pytest.mark.parametrize(("scheme", "message"), [
    (QuantScheme(weights=WeightSpec(8, "channel"), activations=ActivationSpec(8, "dynamic-tensor")), "dynamic-tensor"),
    (QuantScheme(weights=WeightSpec(4, "group", 64), activations=ActivationSpec(8, "dynamic-token")), "W4A8"),
    (QuantScheme(weights=WeightSpec(8, "channel", symmetric=False)), "asymmetric weight-only"),
    (QuantScheme(weights=WeightSpec(8, "channel"), activations=ActivationSpec(8, "dynamic-token"),
                 keep=KeepPolicy(token_ids=(1,))), "no per-token full precision"),
])
def test_inexpressible_schemes_are_refused_before_writing(smollm2, tmp_path, scheme, message) -> None:
    native = _native(smollm2, scheme, None)
    with pytest.raises(SinkquantError, match=message):
        export_compressed_tensors(native, smollm2.tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_prefix_sidecar_is_refused(smollm2, tmp_path) -> None:
    with pytest.raises(SinkquantError, match="exported without a prefix"):
        load_prefix_cache(tmp_path, smollm2.model.config)
    prefix = build_prefix(smollm2.model, [smollm2.bos_id])
    (tmp_path / "prefix.json").write_text(json.dumps({"token_ids": prefix.ids}))
    tensors = {f"layers.{i}.{p}": getattr(layer, p) for i, layer in enumerate(prefix.cache.layers)
               for p in ("keys", "values")}
    tensors["layers.4.values"] = tensors["layers.4.values"][..., :32].contiguous()
    save_file(tensors, str(tmp_path / PREFIX_KV))
    with pytest.raises(SinkquantError, match=r"layers\.4\.values is \(1, 3, 1, 32\)"):
        load_prefix_cache(tmp_path, smollm2.model.config)
