"""The native integer backend computes the simulator's numbers (to float rounding) with integer storage."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load, save

from sinkquant.backends.native import Int8Head, NativeLinear, convert_to_native
from sinkquant.engine.apply import apply_recipe, quantize_model
from sinkquant.errors import SinkquantError
from sinkquant.perplexity import evaluate
from sinkquant.quant.primitives import scale_zero_point
from sinkquant.quant.qweight import QuantizedWeight, quantize_rtn
from sinkquant.quant.scheme import ActivationScheme, KeepPolicy, Scheme, WeightScheme
from sinkquant.quant.simulate import fake_quant_activation
from sinkquant.recipe import parse_recipe
from tests.bounds import rounding_bound

GRIDS = [(8, "channel", None), (8, "tensor", None), (4, "group", 64), (4, "channel", None), (8, "group", 32)]
ACTIVATIONS = [None, ("static", True), ("static", False), ("dynamic-token", True), ("dynamic-token", False),
               ("dynamic-tensor", False)]


def _keep(mask: torch.Tensor | None) -> SimpleNamespace:
    return SimpleNamespace(mask_for=lambda x: mask)


def _simulated(x, qweight, bias, spec, keep, scale, zero_point) -> torch.Tensor:
    """The simulator's math: fake-quantized activations times the dequantized weight."""
    xs = x if spec is None else fake_quant_activation(x, spec, keep, scale, zero_point)
    return F.linear(xs, qweight.dequantize(), bias)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _layer(weight, bias, x, keep, grid, weight_symmetric, act):
    bits, granularity, group_size = grid
    qweight = quantize_rtn(weight, bits, granularity, group_size, weight_symmetric)
    spec = scale = zero_point = None
    if act is not None:
        spec = ActivationScheme(bits=8, mode=act[0], symmetric=act[1])
        ranged = x if keep is None else x.masked_fill(keep.unsqueeze(-1), 0.0)
        scale, zero_point = scale_zero_point(ranged.amin(), ranged.amax(), 8, act[1])
    return qweight, spec, scale, zero_point, NativeLinear(qweight, bias, spec, scale, zero_point, _keep(keep))


@pytest.mark.parametrize("weight_symmetric", [True, False])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"w{g[0]}-{g[1]}")
@pytest.mark.parametrize("act", ACTIVATIONS,
                         ids=lambda a: "a16" if a is None else f"{a[0]}-{'sym' if a[1] else 'asym'}")
def test_layer_matches_simulator_on_random_data(grid, weight_symmetric, act) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    x = torch.randn(2, 5, 128) * 3
    x[:, 0] *= 50  # a sink row: kept in fp, it must neither be quantized nor shape a dynamic range
    keep = torch.zeros(2, 5, dtype=torch.bool)
    keep[:, 0] = True
    qweight, spec, scale, zero_point, native = _layer(weight, bias, x, keep, grid, weight_symmetric, act)
    out = native(x)
    reference = _simulated(x, qweight, bias, spec, keep, scale, zero_point)
    assert out.shape == reference.shape
    assert _relative(out[keep], reference[keep]) < 1e-5
    assert _relative(out[~keep], reference[~keep]) < 1e-5
    if spec is not None:  # activation quantization really happened on the unkept rows
        weight_only = F.linear(x, qweight.dequantize(), bias)
        assert _relative(weight_only[~keep], reference[~keep]) > 1e-4


def test_kernels_are_integer_where_the_grid_allows() -> None:
    weight = torch.randn(64, 128)
    static = ActivationScheme(bits=8, mode="static", symmetric=True)
    one, zero = torch.tensor(0.1), torch.tensor(0.0)
    w8a8 = NativeLinear(quantize_rtn(weight, 8, "channel"), None, static, one, zero)
    w8a16 = NativeLinear(quantize_rtn(weight, 8, "channel"))
    w4a16 = NativeLinear(quantize_rtn(weight, 4, "group", 64, symmetric=False))
    assert w8a8.kernel() == "int8 GEMM (torch._int_mm)"
    assert "limbs" in w8a16.kernel()
    assert "dequantized per call" in w4a16.kernel()


def test_state_dict_stores_integers_and_round_trips() -> None:
    torch.manual_seed(1)
    weight, bias, x = torch.randn(64, 128), torch.randn(64), torch.randn(3, 128)
    static = ActivationScheme(bits=8, mode="static", symmetric=False)
    scale, zero_point = scale_zero_point(x.amin(), x.amax(), 8, False)
    for qweight, dtype, columns in ((quantize_rtn(weight, 8, "channel"), torch.int8, 128),
                                    (quantize_rtn(weight, 4, "group", 64, symmetric=False), torch.uint8, 64)):
        native = NativeLinear(qweight, bias, static, scale, zero_point)
        state = native.state_dict()
        assert set(state) == {"qweight", "weight_scale", "weight_zero_point", "bias", "act_scale", "act_zero_point"}
        assert state["qweight"].dtype == dtype and state["qweight"].shape == (64, columns)
        other = quantize_rtn(torch.randn(64, 128), qweight.bits, qweight.granularity, qweight.group_size,
                             qweight.symmetric)
        restored = NativeLinear(other, bias, static, scale * 2, zero_point)
        restored.load_state_dict(load(save(state)))  # through safetensors, as an artifact stores it
        torch.testing.assert_close(restored(x), native(x), rtol=0, atol=0)
        assert torch.equal(restored.quantized_weight().qweight, qweight.qweight)


def test_bad_state_dict_names_the_tensor() -> None:
    native = NativeLinear(quantize_rtn(torch.randn(64, 128), 4, "group", 64))
    state = native.state_dict()
    with pytest.raises(SinkquantError, match=r"tensor 0\.weight_scale is missing"):
        torch.nn.Sequential(native).load_state_dict({"0.qweight": state["qweight"]})
    bad = {**state, "qweight": state["qweight"].to(torch.int8)}
    with pytest.raises(SinkquantError, match=r"tensor qweight is torch.int8 \(64, 64\), expected torch.uint8"):
        native.load_state_dict(bad)
    wider = {**state, "weight_scale": torch.ones(64, 4)}
    with pytest.raises(SinkquantError, match=r"tensor weight_scale is .* \(64, 4\), expected .* \(64, 2\)"):
        native.load_state_dict(wider)


def test_from_quant_linear_and_bad_input() -> None:
    weight = torch.randn(32, 64)
    qweight = quantize_rtn(weight, 8, "channel")
    layer = torch.nn.Module()
    layer.qweight, layer.bias, layer.activations, layer.keep = qweight, None, None, None
    model = torch.nn.Sequential(layer)
    assert convert_to_native(model) == ["0"]
    assert isinstance(model[0], NativeLinear) and model[0].act_mode is None
    x = torch.randn(2, 64)
    torch.testing.assert_close(model(x), F.linear(x, qweight.dequantize()), rtol=1e-5, atol=1e-5)
    with pytest.raises(SinkquantError, match="QuantizedWeight"):
        NativeLinear.from_quant_linear(torch.nn.Linear(4, 4))
    with pytest.raises(SinkquantError, match="needs act_scale"):
        NativeLinear(qweight, activations=ActivationScheme(bits=8, mode="static"))
    with pytest.raises(SinkquantError, match="activations.mode"):
        NativeLinear(qweight, activations=SimpleNamespace(bits=8, mode="per-channel", symmetric=True))


def _capture_inputs(loaded, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    handles = [loaded.model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: captured.__setitem__(n, args[0].detach())) for n in names]
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("act", [("static", True), ("static", False), ("dynamic-token", True)],
                         ids=lambda a: f"{a[0]}-{'sym' if a[1] else 'asym'}")
def test_layer_matches_simulator_on_smollm2_inputs(smollm2, wikitext_stream, act) -> None:
    """Real activations, sink row (position 0, |h| in the thousands at down_proj) kept in fp."""
    names = ["model.layers.11.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    captured = _capture_inputs(smollm2, names, wikitext_stream.ids[:64][None])
    keep = torch.zeros(1, 64, dtype=torch.bool)
    keep[0, 0] = True
    for name in names:
        linear = smollm2.model.get_submodule(name)
        x = captured[name]
        qweight, spec, scale, zero_point, native = _layer(linear.weight, linear.bias, x, keep, (8, "channel", None),
                                                          True, act)
        with torch.no_grad():
            out = native(x)
        reference = _simulated(x, qweight, linear.bias, spec, keep, scale, zero_point)
        assert _relative(out, reference) < 1e-5, name


SCHEMES = {
    "w8a8-keep-sink": (Scheme(weights=WeightScheme(bits=8, granularity="channel"),
                              activations=ActivationScheme(bits=8, mode="static", symmetric=True)),
                       KeepPolicy(positions=(0,))),
    "w8a16": (Scheme(weights=WeightScheme(bits=8, granularity="channel")), KeepPolicy()),
    "w4a16-group64": (Scheme(weights=WeightScheme(bits=4, granularity="group", group_size=64, symmetric=False)),
                      KeepPolicy()),
}


def _quantized_copy(loaded, scheme: Scheme, calib: list[torch.Tensor] | None = None,
                    keep: KeepPolicy | None = None):
    """The engine's simulated layers on a copy of the model (the original stays untouched)."""
    target = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    quantize_model(target, scheme, calibration=None if calib is None else torch.cat(calib), keep=keep)
    return target.model


@pytest.mark.parametrize("recipe", list(SCHEMES))
def test_model_perplexity_matches_simulator(smollm2, wikitext_stream, eval_and_calib, recipe) -> None:
    """Whole SmolLM2, same windows. Weight-only: within 0.3% of the simulated perplexity. With rounded
    activations a value within float rounding of a grid boundary may land one level apart, and a model this
    far from fp32 amplifies that: the bound is then 0.3% plus tests/bounds.py's multiple of the simulator's own
    float32-vs-float64 spread (measured here, the same math)."""
    plan, calib, _ = eval_and_calib(128, 2, 1)
    scheme, keep = SCHEMES[recipe]
    simulated = _quantized_copy(smollm2, scheme, calib, keep)
    sim_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", model=simulated, progress=False).ppl
    tolerance = 3e-3
    if scheme.activations is not None:
        sim64_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", model=copy.deepcopy(simulated).double(),
                             progress=False).ppl
        tolerance = rounding_bound(tolerance, sim_ppl, sim64_ppl)
    converted = convert_to_native(simulated)
    assert len(converted) == 30 * 7
    native_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", model=simulated, progress=False).ppl
    assert abs(native_ppl / sim_ppl - 1) < tolerance, (native_ppl, sim_ppl, tolerance)
    int_bytes = sum(b.numel() * b.element_size() for n, b in simulated.named_buffers() if n.endswith(".qweight"))
    fp_bytes = sum(smollm2.model.get_submodule(n).weight.numel() * 4 for n in converted)
    assert int_bytes <= fp_bytes * (0.25 if scheme.weights.bits == 8 else 0.125)


def test_generate_with_native_model(smollm2) -> None:
    scheme = Scheme(weights=WeightScheme(bits=8, granularity="channel"),
                    activations=ActivationScheme(bits=8, mode="dynamic-token"))
    simulated = _quantized_copy(smollm2, scheme)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = simulated.generate(ids, max_new_tokens=8, do_sample=False)
        convert_to_native(simulated)
        out = simulated.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("recipe", ["w8a8-keep-sink", "w8a16"])
def test_sibling_groups_are_bit_identical_to_layers_run_alone(smollm2, wikitext_stream, eval_and_calib,
                                                                recipe) -> None:
    """q/k/v and gate/up run as one quantization and one GEMM: integer sums are exact and the rest is
    elementwise, so the logits must equal those of the same layers run one by one, to the bit; a member
    called alone, and a reload of new integers in place, stay correct; the members' weights are views."""
    _, calib, _ = eval_and_calib(64, 1, 1)
    scheme, keep = SCHEMES[recipe]
    grouped = _quantized_copy(smollm2, scheme, calib, keep)
    convert_to_native(grouped)
    alone = copy.deepcopy(grouped)
    layers = [m for m in alone.modules() if isinstance(m, NativeLinear)]
    assert sum(m.group is not None for m in layers) == 30 * 5  # q, k, v, gate, up of every layer
    for module in layers:
        module.group = None
    ids = wikitext_stream.windows(64, [0])
    with torch.inference_mode():  # inference tensors have no version counter
        assert torch.equal(grouped(input_ids=ids).logits, alone(input_ids=ids).logits)
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=ids).logits, alone(input_ids=ids).logits)
        k_grouped = grouped.model.layers[3].self_attn.k_proj
        k_alone = alone.model.layers[3].self_attn.k_proj
        x = torch.randn(1, 64, 576)  # the keep mask of the last forward covers 64 positions
        assert torch.equal(k_grouped(x), k_alone(x))  # alone: computed afresh, not someone else's columns
        v = grouped.model.layers[3].self_attn.v_proj
        assert v.qweight.untyped_storage().data_ptr() == k_grouped.qweight.untyped_storage().data_ptr()
        v_alone = alone.model.layers[3].self_attn.v_proj
        before = v_alone(x)
        k_grouped(x)  # the group now holds v's columns for x, computed with the old integers
        state = {**v.state_dict(), "qweight": -v.qweight}
        v.load_state_dict(state)  # in place, through the view: the fused kernels and that output must go
        v_alone.load_state_dict(state)
        assert torch.equal(v(x), v_alone(x)) and not torch.allclose(v(x), before)


def test_int8_head_runs_the_lm_head_on_its_int8_rows_and_reloads(smollm2, wikitext_stream, tmp_path) -> None:
    """scheme.embeddings int8 under the native backend: the (tied) lm_head runs on the int8 rows it is rounded
    to, within limb precision of the float product, adds nothing to the state dict and comes back on reload."""
    from sinkquant.engine import load, save

    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" /
                           "w8a8-prefix-smooth-except-native.yaml").read_text())
    native = apply_recipe(smollm2, parse_recipe({**data, "calibration": {"windows": 1}}), wikitext_stream, ctx=64,
                          copy=True)
    head = native.model.get_output_embeddings()
    assert isinstance(head, Int8Head) and head.weight is native.model.get_input_embeddings().weight
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        assert _relative(head(x), F.linear(x, head.weight)) < 1e-5
        window = torch.randn(1, 65, 576)  # beyond 64 rows the float GEMM on the same rounded weight is faster
        assert torch.equal(head(window), F.linear(window, head.weight))
        assert head._w_int8.dtype == torch.int8 and not any("_w_int8" in k for k in native.model.state_dict())
        ids = wikitext_stream.windows(64, [0])
        expected = native.model(input_ids=ids, past_key_values=native.cache_for_batch(1)).logits
        reloaded = load(save(native, tmp_path / "artifact"))
        assert isinstance(reloaded.model.get_output_embeddings(), Int8Head)
        assert torch.equal(reloaded.model(input_ids=ids, past_key_values=reloaded.cache_for_batch(1)).logits,
                           expected)


def test_native_backend_refuses_what_it_cannot_run_at_parse_time() -> None:
    base = {"name": "n", "description": "d", "backend": "native"}
    cases = [({"activations": {"bits": 8, "mode": "dynamic-token"}}, "needs scheme.weights"),
             ({"weights": {"bits": 4, "granularity": "group", "group_size": 64}, "activations": {"bits": 8}},
              "scheme.weights.granularity='group' with scheme.activations"),
             ({"weights": {"bits": 8}, "kv": {"bits": 8, "granularity": "head"}}, "scheme.kv granularity='head'"),
             ({"weights": {"bits": 8}, "kv": {"bits": 4}}, "bits=4 is not stored")]
    for scheme, message in cases:
        with pytest.raises(SinkquantError, match=message):
            parse_recipe({**base, "scheme": scheme})
    assert parse_recipe({**base, "scheme": {"weights": {"bits": 8}, "kv": {"bits": 8}}}).backend == "native"


FAITHFUL = ["w8a8-prefix-smooth-except", "w8a16", "w8a8-dynamic-token"]


@pytest.mark.long
@pytest.mark.parametrize("name", FAITHFUL)
def test_native_backend_recipe_matches_simulated_recipe(smollm2, wikitext_stream, eval_and_calib, name) -> None:
    """Issue 12 item 3: the shipped W8 recipe through apply_recipe with backend simulated and native, the same
    16 windows of 128 tokens. Weight-only: within 0.3%. With rounded activations a value within float rounding
    of a grid boundary may land one level apart and a model this far from fp32 amplifies that (at 2 windows one
    flipped level moves the perplexity by ~1% either way): the bound is then 0.3% plus tests/bounds.py's multiple
    of the simulator's own float32-vs-float64 spread (the same math, measured here)."""
    plan, _, _ = eval_and_calib(128, 16, 1)
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / f"{name}.yaml").read_text())
    recipe = parse_recipe(data)
    simulated = apply_recipe(smollm2, recipe, wikitext_stream, ctx=128, copy=True)
    native = apply_recipe(smollm2, parse_recipe({**data, "backend": "native"}), wikitext_stream, ctx=128, copy=True)
    assert native.record["native"]["converted_layers"] == 30 * 7
    assert not any(isinstance(getattr(m, "qweight", None), QuantizedWeight) for m in native.model.modules())
    sim_ppl = simulated.evaluate(wikitext_stream, plan, progress=False).ppl
    native_ppl = native.evaluate(wikitext_stream, plan, progress=False).ppl
    tolerance = 3e-3
    if recipe.scheme.activations is not None:
        sim64_ppl = evaluate(smollm2, wikitext_stream, plan, bos="never", prefix=simulated.prefix,
                             model=copy.deepcopy(simulated.model).double(), progress=False).ppl
        tolerance = rounding_bound(tolerance, sim_ppl, sim64_ppl)
    print(f"{name}: simulated {sim_ppl:.4f} native {native_ppl:.4f} ratio-1 {native_ppl / sim_ppl - 1:+.5f} "
          f"bound {tolerance:.5f}")
    assert abs(native_ppl / sim_ppl - 1) < tolerance, (native_ppl, sim_ppl, tolerance)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rotated_model_runs_natively_with_its_online_transforms(arch, smollm2, tmp_path) -> None:
    """The online Hadamard before down_proj moves with the layer into the native backend (it was once dropped
    silently), the logits match the simulated rotated model, and the export refuses what it cannot express
    (GPT-2's LayerNorms turned into RMS norms; Llama's rotation exports: tests/test_export.py)."""
    from sinkquant.backends.export import export
    from sinkquant.data import TokenStream
    from tests.tiny import tiny_model

    stream = TokenStream(ids=torch.randint(3, 5000, (64 * 4,), generator=torch.Generator().manual_seed(0)),
                         text_sha256="random", source={})
    ids = stream.windows(64, [0])
    data = {"name": "r", "description": "d", "steps": [{"rotate": {}}],
            "scheme": {"weights": {"bits": 8, "granularity": "channel"}}, "calibration": {"windows": 1}}
    logits = {}
    for backend in ("simulated", "native"):
        quantized = apply_recipe(tiny_model(arch, smollm2.tokenizer), parse_recipe({**data, "backend": backend}),
                                 stream, ctx=64)
        with torch.no_grad():
            logits[backend] = quantized.model(input_ids=ids).logits
    adapter = quantized.base.adapter
    down = quantized.model.get_submodule(f"{adapter.layers}.0.{adapter.down_proj}")
    assert isinstance(down, NativeLinear) and hasattr(down, "input_rotation") and down._forward_pre_hooks
    torch.testing.assert_close(logits["native"], logits["simulated"], rtol=1e-4, atol=1e-4)
    if arch == "gpt2":
        with pytest.raises(SinkquantError, match="step 'rotate': LayerNorms turned into RMS norms"):
            export(quantized, tmp_path / "export")
        assert not (tmp_path / "export").exists()
