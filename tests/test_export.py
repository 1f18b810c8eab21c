"""compressed-tensors export: transformers (through the real compressed-tensors package) loads the folder and
computes what the native backend computes; the fp prefix KV travels beside it; what the format cannot express
is refused before anything is written."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sinkquant.backends.export import PREFIX_KV, export, export_compressed_tensors, load_prefix_cache
from sinkquant.backends.native import NativeLinear, convert_to_native
from sinkquant.engine.apply import apply_recipe, quantize_session
from sinkquant.engine.session import Session
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import Prefix, build_prefix, evaluate
from sinkquant.quant.scheme import ActivationScheme, KeepPolicy, Scheme, WeightScheme
from sinkquant.recipes.schema import parse_recipe


def _native(smollm2, scheme: Scheme, calib: list[torch.Tensor] | None, keep: KeepPolicy | None = None,
            prefix: Prefix | None = None) -> torch.nn.Module:
    """The engine's quantization of a copy (calibrated behind `prefix`, as the prefix step does), converted."""
    target = dataclasses.replace(smollm2, model=copy.deepcopy(smollm2.model))
    windows = torch.cat(calib) if calib else torch.empty(0, 0, dtype=torch.long)
    session = Session(loaded=target, scheme=scheme, calibration=windows, prefix=prefix, keep=keep or KeepPolicy(),
                      progress=False)
    quantize_session(session)
    convert_to_native(target.model)
    return target.model


def _w8(activations: ActivationScheme | None = None, symmetric: bool = True) -> Scheme:
    return Scheme(weights=WeightScheme(bits=8, granularity="channel", symmetric=symmetric), activations=activations)


def test_w8a8_static_with_prefix_round_trips(smollm2, wikitext_stream, eval_and_calib, tmp_path) -> None:
    """BOS as an fp prefix (its position kept, so calibration never sees it), static per-tensor W8A8. 8 windows:
    at 2, a perturbation of 1e-7 (float32 vs float64, or 64-byte aligned weights instead of file-mapped ones)
    moved this naive static model's perplexity by 1-4% either way, more than any bound on the export itself."""
    plan, calib, _ = eval_and_calib(128, 8, 1)
    prefix = build_prefix(smollm2.model, [smollm2.bos_id])
    scheme = _w8(ActivationScheme(bits=8, mode="static", symmetric=False))
    native = _native(smollm2, scheme, calib, KeepPolicy(positions=(0,)), prefix)
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
    native = _native(smollm2, Scheme(weights=WeightScheme(bits=4, granularity="group", group_size=64)), None)
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


@pytest.mark.parametrize(("scheme", "keep", "message"), [
    (_w8(ActivationScheme(bits=8, mode="dynamic-tensor")), None, "dynamic-tensor"),
    (Scheme(weights=WeightScheme(bits=4, granularity="group", group_size=64),
            activations=ActivationScheme(bits=8, mode="dynamic-token")), None, "W4A8"),
    (_w8(symmetric=False), None, "asymmetric weight-only"),
    (_w8(ActivationScheme(bits=8, mode="dynamic-token")), KeepPolicy(token_ids=(1,)), "no per-token full precision"),
])
def test_inexpressible_schemes_are_refused_before_writing(smollm2, tmp_path, scheme, keep, message) -> None:
    native = _native(smollm2, scheme, None, keep)
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


def test_engine_w8a8_prefix_model_round_trips_through_export(smollm2, wikitext_stream, eval_and_calib,
                                                              tmp_path) -> None:
    """`export` of a QuantizedModel from apply_recipe (native backend: smoothing folded in, exceptions as a
    weight-only group, the fp prefix beside the model): transformers + compressed-tensors load it, and with the
    sidecar prefix its perplexity is the native backend's within 0.5% (plus the native model's own
    float32-vs-float64 spread, activations being rounded)."""
    plan, _, _ = eval_and_calib(128, 2, 1)
    # The shipped recipe with BOS as its prefix (its profile-chosen prefix is a choice of the prefix step).
    data = yaml.safe_load(Path("recipes/w8a8-prefix-smooth-except-native.yaml").read_text())
    data["steps"][0] = {"prefix": {"tokens": [], "max_tokens": 1, "bos": "always"}}
    quantized = apply_recipe(smollm2, parse_recipe(data), wikitext_stream, ctx=128, copy=True)
    out = export(quantized, tmp_path / "engine")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    exceptions = quantized.step_record("exceptions")["layers"]
    weight_only = [g for g in config["config_groups"].values() if g["input_activations"] is None]
    assert len(weight_only) == 1 and len(weight_only[0]["targets"]) == len(exceptions) == 8
    assert json.loads((out / "sinkquant_export.json").read_text())["recipe"]["backend"] == "native"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids, cache = load_prefix_cache(out, loaded.config)
    assert ids == quantized.prefix.ids
    exported_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=Prefix(ids=ids, cache=cache), model=loaded,
                            progress=False).ppl
    native_ppl = quantized.evaluate(wikitext_stream, plan, progress=False).ppl
    native64_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=quantized.prefix,
                            model=copy.deepcopy(quantized.model).double(), progress=False).ppl
    print(f"export round trip: exported {exported_ppl:.4f} native {native_ppl:.4f} native f64 {native64_ppl:.4f}")
    assert abs(exported_ppl / native_ppl - 1) < 5e-3 + 2 * abs(native64_ppl / native_ppl - 1)
    with pytest.raises(SinkquantError, match="format='gguf' is not valid"):
        export(quantized, tmp_path / "other", format="gguf")
