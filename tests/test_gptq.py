"""GPTQ against round-to-nearest on the same grid: on random correlated inputs and on a real SmolLM2 Linear
fed real WikiText-2 calibration activations."""

from __future__ import annotations

import logging

import pytest
import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.gptq import HessianAccumulator, gptq_quantize, search_grid
from sinkquant.quant.primitives import qrange
from sinkquant.quant.qweight import grid_params, quantize_rtn, quantize_with


def _correlated(rows: int, width: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels and a few wide ones, like a Linear's real inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) @ torch.randn(width, width, generator=gen) / width**0.5
    x[:, :4] *= 8
    return x


def _output_error(x: torch.Tensor, weight: torch.Tensor, deq: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ weight.T - x @ deq.T))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def _assert_valid(qw, weight: torch.Tensor, bits: int, granularity: str, group_size: int | None,
                  symmetric: bool) -> None:
    qmin, qmax = qrange(bits, symmetric)
    assert qw.qweight.shape == weight.shape
    assert qw.qweight.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(qw.qweight.min()) >= qmin and int(qw.qweight.max()) <= qmax
    expected = {"tensor": (), "channel": (weight.shape[0], 1),
                "group": (weight.shape[0], weight.shape[1] // (group_size or 1))}[granularity]
    assert tuple(qw.scale.shape) == expected and tuple(qw.zero_point.shape) == expected
    assert bool((qw.scale > 0).all())
    if symmetric:
        assert bool((qw.zero_point == 0).all())
    else:
        assert bool((qw.zero_point == qw.zero_point.round()).all())
    assert torch.isfinite(qw.dequantize()).all()


GRIDS = [  # bits, granularity, group_size, symmetric, act_order, mse_clip
    (4, "channel", None, True, False, False),
    (4, "group", 32, True, False, False),
    (4, "group", 32, False, False, False),
    (4, "group", 32, True, True, False),
    (4, "group", 32, False, True, True),
    (4, "channel", None, False, True, False),
    (8, "channel", None, True, False, False),
    (4, "tensor", None, True, False, False),
]


@pytest.mark.parametrize(("bits", "granularity", "group_size", "symmetric", "act_order", "mse_clip"), GRIDS)
def test_gptq_beats_rtn_on_random_inputs(bits, granularity, group_size, symmetric, act_order, mse_clip):
    x = _correlated(512, 128, seed=1)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    qw = gptq_quantize(weight, _hessian(x), bits, granularity, group_size, symmetric, act_order=act_order,
                       block_size=64, mse_clip=mse_clip)
    _assert_valid(qw, weight, bits, granularity, group_size, symmetric)
    rtn = quantize_rtn(weight, bits, granularity, group_size, symmetric)
    gptq_error, rtn_error = _output_error(x, weight, qw.dequantize()), _output_error(x, weight, rtn.dequantize())
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_act_order_groups_are_static_and_contiguous():
    """With act_order every group's grid is the natural-order min/max grid of the original weight."""
    x = _correlated(256, 64, seed=3)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    qw = gptq_quantize(weight, _hessian(x), 4, "group", 16, False, act_order=True)
    scale, zero_point = grid_params(weight, 4, "group", 16, False)
    assert torch.equal(qw.scale, scale) and torch.equal(qw.zero_point, zero_point)
    assert qw.group_size == 16 and qw.granularity == "group"


def test_deterministic_and_bit_exact_dequantize():
    x = _correlated(256, 64, seed=5)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    h = _hessian(x)
    first = gptq_quantize(weight, h, 4, "group", 16, True, act_order=True, mse_clip=True)
    second = gptq_quantize(weight, h, 4, "group", 16, True, act_order=True, mse_clip=True)
    assert torch.equal(first.qweight, second.qweight) and torch.equal(first.scale, second.scale)
    # The integers re-quantize their own dequantized weight unchanged: the values lie on the grid.
    requant = torch.round(first.dequantize() / first._expand(first.scale)) + first._expand(first.zero_point)
    assert torch.equal(requant.to(torch.int8), first.qweight)


def test_a_consumed_hessian_gives_the_same_integers():
    """overwrite_hessian (the pipeline's: its float32 Hessian is not needed after) dampens the caller's tensor in
    place instead of a copy, and changes nothing else; without it the caller's Hessian is left as it was."""
    x = _correlated(256, 64, seed=11)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(12))
    h = _hessian(x).to(torch.float32)
    kept = h.clone()
    copied = gptq_quantize(weight, h, 4, "group", 16, True)
    assert torch.equal(h, kept)
    consumed = gptq_quantize(weight, h, 4, "group", 16, True, overwrite_hessian=True)
    assert torch.equal(copied.qweight, consumed.qweight) and torch.equal(copied.scale, consumed.scale)
    assert not torch.equal(h, kept)  # dampened in place


def test_mse_clip_lowers_reconstruction_error():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    weight[:, 0] *= 10  # one wide column stretches every row's min/max grid
    plain = grid_params(weight, 4, "channel", None, True)
    searched = search_grid(weight, 4, "channel", None, True, mse_clip=True)
    assert bool((searched[0] <= plain[0]).all()) and bool((searched[0] < plain[0]).any())
    plain_err = (quantize_with(weight, *plain, 4, "channel", None, True).dequantize() - weight).pow(2).sum(1)
    mse_err = (quantize_with(weight, *searched, 4, "channel", None, True).dequantize() - weight).pow(2).sum(1)
    assert bool((mse_err <= plain_err).all()) and float(mse_err.sum()) < float(plain_err.sum())


def test_dead_columns_quantize_to_zero():
    x = _correlated(256, 32, seed=8)
    x[:, 5] = 0.0
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(9))
    h = _hessian(x)
    assert float(h[5, 5]) == 0.0
    qw = gptq_quantize(weight, h, 4, "channel", None, True)
    assert bool((qw.dequantize()[:, 5] == 0).all())


def test_indefinite_hessian_gets_more_dampening(caplog):
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # eigenvalues -1 and 3
    weight = torch.tensor([[0.5, -0.25], [1.0, 0.75]])
    with caplog.at_level(logging.WARNING, logger="sinkquant.quant.gptq"):
        qw = gptq_quantize(weight, h, 8, "channel", None, True)
    assert "used damp=" in caplog.text
    assert torch.allclose(qw.dequantize(), weight, atol=0.01)


def test_kept_rows_are_left_out_of_the_hessian():
    x = _correlated(3 * 40, 16, seed=10).reshape(3, 40, 16)
    kept = torch.zeros(3, 40, dtype=torch.bool)
    kept[:, 0] = True
    x[:, 0] = 1000.0  # a sink-like row that must not shape the Hessian
    masked = HessianAccumulator(16)
    masked.add(x, kept=kept)
    plain = HessianAccumulator(16)
    plain.add(x[:, 1:])
    assert masked.rows == 3 * 39
    assert torch.allclose(masked.hessian(), plain.hessian(), rtol=1e-12, atol=0)
    assert masked.hessian().dtype == torch.float64
    # the float32 copy gptq_quantize factorises: the float64 sum rounded once, the accumulator left as it was
    assert masked.hessian(torch.float32).dtype == torch.float32
    assert torch.allclose(masked.hessian(torch.float32).double(), plain.hessian(), rtol=1e-6, atol=0)
    assert torch.equal(masked.hessian(), masked.hessian())


@pytest.mark.parametrize("call", [
    lambda: gptq_quantize(torch.randn(4, 8), torch.eye(6), 4, "channel"),
    lambda: gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, "group", 3),
    lambda: gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, "row"),
    lambda: gptq_quantize(torch.randn(4, 8), torch.eye(8), 4, "channel", damp=0.0),
    lambda: gptq_quantize(torch.randn(4, 8), torch.eye(8), 1, "channel"),
    lambda: HessianAccumulator(8).hessian(),
    lambda: HessianAccumulator(8).add(torch.randn(3, 7)),
    lambda: HessianAccumulator(8).add(torch.randn(3, 8), kept=torch.zeros(4, dtype=torch.bool)),
])
def test_bad_input_is_a_sinkquant_error(call):
    with pytest.raises(SinkquantError):
        call()


REAL_LINEARS = ("model.layers.12.mlp.down_proj", "model.layers.3.self_attn.q_proj", "model.layers.20.mlp.up_proj")


def _linear_inputs(loaded, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each REAL_LINEARS layer's inputs over `ids`, from one forward pass."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in REAL_LINEARS:
        module = loaded.model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0].detach().reshape(-1, m.in_features))))
    try:
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def real_inputs(smollm2, wikitext_stream) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(calibration, held-out) inputs: the last 4 windows of ctx 512 and the first evaluation window."""
    from sinkquant.data import plan_windows

    plan = plan_windows(wikitext_stream, ctx=512, max_windows=1, calib_windows=4)
    return (_linear_inputs(smollm2, wikitext_stream.windows(512, list(plan.calib_windows))),
            _linear_inputs(smollm2, wikitext_stream.windows(512, list(plan.eval_windows))))


# held_out: also assert on a window GPTQ never saw. Measured: with 2048 calibration rows for its 1536 inputs,
# down_proj's GPTQ error on the first evaluation window is ~5% above round-to-nearest's (it fits the
# calibration rows, 90 vs 155); the attention and up_proj inputs generalise (109 vs 156, 120 vs 174).
@pytest.mark.parametrize(("name", "bits", "granularity", "group_size", "symmetric", "act_order", "held_out"), [
    ("model.layers.12.mlp.down_proj", 4, "group", 64, True, False, False),
    ("model.layers.3.self_attn.q_proj", 4, "group", 32, False, True, True),
    ("model.layers.20.mlp.up_proj", 8, "channel", None, True, False, True),
    ("model.layers.20.mlp.up_proj", 4, "group", 64, True, False, True),
])
def test_gptq_beats_rtn_on_a_real_smollm2_linear(smollm2, real_inputs, name, bits, granularity, group_size,
                                                   symmetric, act_order, held_out):
    calib = real_inputs[0][name]
    weight = smollm2.model.get_submodule(name).weight.detach()
    acc = HessianAccumulator(weight.shape[1])
    acc.add(calib)
    qw = gptq_quantize(weight, acc.hessian(), bits, granularity, group_size, symmetric, act_order=act_order)
    _assert_valid(qw, weight, bits, granularity, group_size, symmetric)
    rtn = quantize_rtn(weight, bits, granularity, group_size, symmetric).dequantize()
    checked = [calib]
    if held_out:
        checked.append(real_inputs[1][name])
    for x in checked:
        assert _output_error(x, weight, qw.dequantize()) < 0.9 * _output_error(x, weight, rtn)
