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

from sinkquant.backends.export import export
from sinkquant.backends.export.compressed_tensors import (
    PREFIX_KV,
    export_compressed_tensors,
    load_prefix_cache,
)
from sinkquant.backends.native import NativeLinear, convert_to_native
from sinkquant.data import plan_windows
from sinkquant.engine.apply import apply_recipe, quantize_session
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import Prefix, build_prefix, evaluate
from sinkquant.quant.scheme import ActivationScheme, KeepPolicy, Scheme, WeightScheme
from sinkquant.recipe import parse_recipe
from sinkquant.steps.session import Session
from tests.bounds import rounding_bound


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
    # model amplifies it, so the bound adds a multiple of the native model's float32-vs-float64 spread (bounds.py).
    native64_ppl = evaluate(smollm2, wikitext_stream, plan, prefix=prefix, model=copy.deepcopy(native).double(),
                            progress=False).ppl
    tolerance = rounding_bound(5e-3, native_ppl, native64_ppl)
    assert abs(exported_ppl / native_ppl - 1) < tolerance, (exported_ppl, native_ppl, native64_ppl)
    # Layer level (the first forward decompressed the weights): the same numbers to float rounding,
    # compressed-tensors rounding the activations itself. An input within float rounding of a grid boundary may land
    # one level apart (its x / scale need not match sinkquant's to the last bit: 0.04 of 160 in one output, seen with
    # compressed-tensors 0.20.1), which moves that token's whole output row, so all rows but a few are held to 1e-5.
    # The shape of the last forward, whose keep mask (none kept) is current.
    x = torch.randn(1, 128, 1536, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        a, b = loaded.get_submodule(name)(x), native.get_submodule(name)(x)
    row_error = (a - b).abs().amax(dim=-1) / b.abs().max()
    assert int((row_error > 1e-5).sum()) <= 8, row_error.topk(10).values
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
    assert abs(exported_ppl / native_ppl - 1) < rounding_bound(5e-3, native_ppl, native64_ppl)
    with pytest.raises(SinkquantError, match="format='gguf' is not valid"):
        export(quantized, tmp_path / "other", format="gguf")


def _tiny_llama(smollm2, hidden: int, intermediate: int):
    from transformers import LlamaConfig

    from sinkquant.models import random_model
    from tests.tiny import VOCAB

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    return random_model(config, smollm2.tokenizer, spec=f"tiny-llama-{hidden}-{intermediate}")


def _random_stream(windows: int, ctx: int = 64):
    from sinkquant.data import TokenStream

    return TokenStream(ids=torch.randint(3, 5000, (ctx * windows,), generator=torch.Generator().manual_seed(0)),
                       text_sha256="random", source={})


ROTATED_W8A8 = {"name": "rotated", "description": "rotation, a one-token fp prefix, static W8A8", "backend": "native",
                "steps": [{"rotate": {}}, {"prefix": {"tokens": ["\n"], "bos": "never", "check": False}}],
                "scheme": {"weights": {"bits": 8, "granularity": "channel"},
                           "activations": {"bits": 8, "mode": "static"}},
                "calibration": {"windows": 2}}


@pytest.mark.parametrize(("hidden", "intermediate", "down_type"), [(64, 128, "hadamard"),
                                                                    (48, 96, "random-hadamard")])
def test_rotated_recipe_round_trips_through_transforms(smollm2, tmp_path, hidden, intermediate, down_type) -> None:
    """The rotate step's fused rotations are in the weights and described as R1/R2; the online Hadamard before
    down_proj is an R4 `input` transform whose matrix is stored (Sylvester where the width is a power of two,
    else Paley x Sylvester: 48 and 96 have no Sylvester matrix). Loaded back by transformers + compressed-tensors
    with it attached, the model computes what the native backend computes; without it, it does not."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    from sinkquant.models import load_model
    from sinkquant.quant.hadamard import hadamard

    stream = _random_stream(12)
    quantized = apply_recipe(_tiny_llama(smollm2, hidden, intermediate), parse_recipe(ROTATED_W8A8), stream, ctx=64)
    out = export(quantized, tmp_path / "ct")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["transform_config"]["config_groups"]
    assert {n: g["type"] for n, g in groups.items()} == {"R1": "random-hadamard", "R2": "random-hadamard",
                                                         "R4": down_type}
    assert [(a["location"], a["inverse"]) for a in groups["R4"]["apply"]] == [("input", False),
                                                                              ("weight_input", True)]
    assert groups["R2"]["head_dim"] == hidden // 4
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        stored = handle.get_tensor("model.layers.0.mlp.down_proj.R4_input.weight")
    expected = deterministic_hadamard_matrix(intermediate, torch.float64) if down_type == "hadamard" \
        else hadamard(intermediate)
    torch.testing.assert_close(stored.double(), expected, rtol=0, atol=0)

    reloaded = load_model(str(out))
    down = reloaded.model.model.layers[1].mlp.down_proj
    assert hasattr(down, "R4_input") and reloaded.model.transform_config.config_groups.keys() == groups.keys()
    plan = plan_windows(stream, 64, max_windows=8, calib_windows=2)
    prefix = Prefix(*load_prefix_cache(out, reloaded.model.config))
    assert prefix.ids == quantized.prefix.ids
    exported = evaluate(reloaded, stream, plan, prefix=prefix, progress=False).ppl
    native = quantized.evaluate(stream, plan, progress=False).ppl
    native64 = evaluate(quantized.base, stream, plan, prefix=quantized.prefix,
                        model=copy.deepcopy(quantized.model).double(), progress=False).ppl
    assert abs(exported / native - 1) < rounding_bound(3e-3, native, native64), (exported, native, native64)
    bare = AutoModelForCausalLM.from_pretrained(out)  # transformers alone drops the online transform
    ids = stream.windows(64, [0])
    with torch.no_grad():  # behind the prefix, as perplexity runs them (the native model keeps its positions)
        reference = quantized.model(input_ids=ids, past_key_values=quantized.cache_for_batch(1)).logits
        with_transforms = reloaded.model(input_ids=ids, past_key_values=prefix.cache_for_batch(1)).logits
        without = bare(input_ids=ids, past_key_values=prefix.cache_for_batch(1)).logits
    error = float((with_transforms - reference).abs().mean())
    assert error < 0.1 * float((without - reference).abs().mean()), error


@pytest.mark.parametrize(("recipe", "arch", "reasons"), [
    ("w4a16-gptq", "llama", []),
    ("w4a16-gptq", "gemma3", ["step 'rotate': online rotation after the post-norms"]),
    ("w4a16-gptq", "gpt2", ["step 'rotate': LayerNorms turned into RMS norms", "step 'rotate': lm_head bias"]),
    ("w4a8kv8-rotate-prefix-gptq", "llama", ["W4A8", "scheme.kv"]),
    ("w4a4kv4-rotate-dynamic", "llama", ["W4A4", "scheme.kv"]),
    ("w4a4kv4-rotate-prefix-gptq", "llama", ["W4A4", "scheme.kv"]),
])
def test_shipped_rotated_recipes_export_or_are_refused_by_name(smollm2, recipe, arch, reasons) -> None:
    from sinkquant.backends.export.compressed_tensors import compressed_tensors_refusals
    from sinkquant.recipe import load_recipe
    from tests.tiny import tiny_model

    found = compressed_tensors_refusals(load_recipe(Path("recipes") / f"{recipe}.yaml"),
                                        tiny_model(arch, smollm2.tokenizer).model)
    assert len(found) == len(reasons) and all(r.startswith(p) for r, p in zip(found, reasons, strict=True)), found


def test_rotated_gemma_is_refused_before_writing(smollm2, tmp_path) -> None:
    from tests.tiny import tiny_model

    data = {**ROTATED_W8A8, "steps": [{"rotate": {}}]}
    quantized = apply_recipe(tiny_model("gemma3", smollm2.tokenizer), parse_recipe(data), _random_stream(4), ctx=64)
    with pytest.raises(SinkquantError, match="step 'rotate': online rotation after the post-norms"):
        export(quantized, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_eval_of_an_export_folder_runs_behind_its_prefix_and_says_so(smollm2, wikitext_path, tmp_path,
                                                                     capsys) -> None:
    """`sinkquant eval --model <export>` once evaluated the compressed-tensors folder without its sidecar prefix,
    silently; it must score what the artifact it came from scores (same windows, its calibration windows left
    out) and print that it used the prefix and the transforms."""
    from sinkquant.cli import main

    loaded = _tiny_llama(smollm2, 64, 128)
    model_dir = tmp_path / "model"
    loaded.model.save_pretrained(model_dir)
    smollm2.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(wikitext_path.read_text()[:30000])
    recipe = tmp_path / "rotated.yaml"
    recipe.write_text(yaml.safe_dump(ROTATED_W8A8))
    common = ["--quiet", "--data", str(text), "--ctx", "64", "--max-windows", "4", "--bos", "never"]
    assert main(["quantize", "--model", str(model_dir), "--recipe", str(recipe), *common,
                 "--out", str(tmp_path / "artifact")]) == 0
    assert main(["export", "--quiet", str(tmp_path / "artifact"), "--out", str(tmp_path / "ct")]) == 0
    assert main(["eval", "--model", str(tmp_path / "artifact"), *common, "--out", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "ct"), *common, "--out", str(tmp_path / "ct.json")]) == 0
    printed = capsys.readouterr().out
    assert "compressed-tensors export: evaluated behind its fp prefix KV (1 tokens" in printed, printed
    assert "transforms R1, R2, R4 (R4 online)" in printed, printed
    artifact, exported = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "ct"))
    assert exported["context_cached"] and exported["context_ids"] == artifact["context_ids"]
    assert exported["tokens"] == artifact["tokens"]
    assert abs(exported["ppl"] / artifact["ppl"] - 1) < 5e-3, (exported["ppl"], artifact["ppl"])

    # every file of the export is in its manifest: an added file is refused unread, an edited one by its sha256
    (tmp_path / "ct" / "added_tokens.json").write_text("{}")
    assert main(["eval", "--model", str(tmp_path / "ct"), *common]) == 2
    assert "added_tokens.json is not listed in" in capsys.readouterr().err
    (tmp_path / "ct" / "added_tokens.json").unlink()
    tokenizer = tmp_path / "ct" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"the"', '"teh"', 1))
    assert main(["eval", "--model", str(tmp_path / "ct"), *common]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and err.count("\n") == 1, err
