"""Quantization round-trips on known tensors, observers that ignore kept positions, scheme validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sinkquant.errors import SinkquantError
from sinkquant.quant import ActivationScheme, KeepPolicy, KVScheme, Scheme, WeightScheme, quantize_rtn
from sinkquant.quant.kv import fake_quant_kv
from sinkquant.quant.observers import make_observer
from sinkquant.quant.primitives import (
    fake_quant_dynamic,
    fake_quant_range,
    qrange,
    quantize_dequantize,
    scale_zero_point,
)
from sinkquant.quant.qweight import QuantizedWeight


def quantize_weight(w: torch.Tensor, bits: int, granularity: str, group_size: int | None = None) -> torch.Tensor:
    return quantize_rtn(w, bits, granularity, group_size).dequantize()


def test_qrange_int8_int4() -> None:
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7)
    assert qrange(4, False) == (0, 15)


def test_symmetric_int8_exact_levels_and_clamp() -> None:
    scale, zp = scale_zero_point(torch.tensor(-1.0), torch.tensor(1.27), 8, True)
    assert float(scale) == pytest.approx(0.01)
    assert float(zp) == 0.0
    x = torch.tensor([0.0, 0.014, 0.016, -0.5, 1.27, 5.0, -5.0])
    out = quantize_dequantize(x, scale, zp, 8, True)
    expected = torch.tensor([0.0, 0.01, 0.02, -0.5, 1.27, 1.27, -1.27])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_asymmetric_int4_zero_point_and_exact_zero() -> None:
    scale, zp = scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), 4, False)
    assert float(scale) == pytest.approx(0.2)
    assert float(zp) == 5.0
    x = torch.tensor([-1.0, 0.0, 0.29, 2.0, 3.0, -2.0])
    out = quantize_dequantize(x, scale, zp, 4, False)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 0.2, 2.0, 2.0, -1.0]), rtol=0, atol=1e-6)


def test_range_widened_to_include_zero() -> None:
    scale, zp = scale_zero_point(torch.tensor(1.0), torch.tensor(3.0), 8, False)
    assert float(zp) == 0.0 and float(scale) == pytest.approx(3.0 / 255)


def test_weight_granularities_levels() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    w[0, 0] = 100.0  # an outlier stretches only its own tensor / row / group
    per_tensor = quantize_weight(w, 4, "tensor")
    per_channel = quantize_weight(w, 4, "channel")
    per_group = quantize_weight(w, 4, "group", 32)
    assert torch.unique(per_tensor).numel() <= 15
    for row in range(8):
        assert torch.unique(per_channel[row]).numel() <= 15
        for g in range(4):
            assert torch.unique(per_group[row, g * 32 : (g + 1) * 32]).numel() <= 15
    err = {k: float((v - w)[1:].abs().mean()) for k, v in (("t", per_tensor), ("c", per_channel), ("g", per_group))}
    assert err["g"] < err["c"] < err["t"]
    assert float(per_group[0, 0]) == pytest.approx(100.0)


def test_group_size_must_divide() -> None:
    with pytest.raises(SinkquantError, match="group_size=64 does not divide the input width 96"):
        quantize_weight(torch.randn(4, 96), 4, "group", 64)


def test_dynamic_per_token_independent_rows() -> None:
    x = torch.tensor([[[1.0, -0.5, 0.25], [1000.0, 3.0, -2.0]]])
    out = fake_quant_dynamic(x, 8, per_token=True)
    # row 0 unaffected by the huge row 1: its own absmax 1.0 gives step 1/127
    torch.testing.assert_close(out[0, 0], torch.round(x[0, 0] * 127) / 127)
    per_tensor = fake_quant_dynamic(x, 8, per_token=False)
    assert float(per_tensor[0, 0, 2]) == 0.0  # 0.25 falls below half a step of 1000/127


def test_observers_ignore_kept_positions() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16)
    x[:, 0, 3] = 5000.0  # the sink token
    keep = torch.zeros(2, 64, dtype=torch.bool)
    keep[:, 0] = True
    for name in ("absmax", "percentile", "mse"):
        ignoring = make_observer(name, 8, True, 99.9)
        ignoring.update(x, keep)
        lo, hi = ignoring.range()
        assert float(hi) < 10.0, name
        assert ignoring.count == 2 * 63 * 16
    plain = make_observer("absmax", 8, True)
    plain.update(x)
    assert float(plain.range()[1]) == 5000.0


def test_observers_accumulate_and_clip() -> None:
    torch.manual_seed(0)
    absmax = make_observer("absmax", 8, True)
    absmax.update(torch.tensor([[[1.0, -2.0]]]))
    absmax.update(torch.tensor([[[3.0, 0.5]]]))
    assert (float(absmax.range()[0]), float(absmax.range()[1])) == (-2.0, 3.0)
    heavy = torch.randn(1, 2048, 8) ** 3  # heavy tails: clipping trades a few big errors for a finer grid
    ranges, errors = {}, {}
    for name in ("absmax", "percentile", "mse"):
        obs = make_observer(name, 4, True, 99.0)
        obs.update(heavy)
        lo, hi = obs.range()
        ranges[name] = float(hi)
        errors[name] = float(((fake_quant_range(heavy, lo, hi, 4, True) - heavy) ** 2).mean())
    assert ranges["absmax"] == float(heavy.max())
    assert ranges["percentile"] == pytest.approx(float(torch.quantile(heavy.abs().flatten(), 0.99)))
    assert ranges["mse"] < ranges["absmax"]
    assert errors["mse"] < errors["absmax"] and errors["mse"] <= errors["percentile"]


def test_observer_without_data_fails() -> None:
    obs = make_observer("absmax", 8, True)
    obs.update(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(SinkquantError, match="saw no values"):
        obs.range()


def test_kv_fake_quant_keeps_positions_bit_exact() -> None:
    torch.manual_seed(0)
    k = torch.randn(2, 3, 10, 16)
    k[:, :, 0] *= 1000
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[:, 0] = True
    for granularity in ("head", "token"):
        out = fake_quant_kv(k, KVScheme(bits=4, granularity=granularity), keep)
        assert torch.equal(out[:, :, 0], k[:, :, 0])
        assert not torch.equal(out[:, :, 1:], k[:, :, 1:])
        assert float((out - k)[:, :, 1:].abs().max()) < 0.5  # the huge kept token did not set the range


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: WeightScheme(bits=9), "bits=9 is not valid"),
        (lambda: WeightScheme(granularity="row"), "Input should be 'tensor', 'channel' or 'group'"),
        (lambda: WeightScheme(granularity="group"), "granularity 'group' needs group_size"),
        (lambda: WeightScheme(granularity="channel", group_size=32), "only applies to granularity 'group'"),
        (lambda: ActivationScheme(mode="per-row"), "Input should be 'static', 'dynamic-tensor' or 'dynamic-token'"),
        (lambda: ActivationScheme(mode="dynamic-token", observer="mse"), "needs mode 'static'"),
        (lambda: KVScheme(bits=2), "bits=2 is not valid"),
        (lambda: KVScheme(granularity="channel"), "Input should be 'head' or 'token'"),
        (lambda: Scheme(exclude="lm_head"), "valid tuple"),
    ],
)
def test_scheme_validation(build, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build()


def test_keep_policy_validation() -> None:
    with pytest.raises(SinkquantError, match="keep.positions"):
        KeepPolicy(positions=(-1,))


@pytest.mark.parametrize(("bits", "granularity", "group_size", "symmetric"),
                         [(8, "channel", None, True), (4, "group", 32, False), (4, "group", 64, True),
                          (8, "tensor", None, False), (3, "channel", None, True)])
def test_integer_weight_round_trips_and_packs(bits, granularity, group_size, symmetric) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    q = quantize_rtn(w, bits, granularity, group_size, symmetric)
    lo, hi = qrange(bits, symmetric)
    assert int(q.qweight.min()) >= lo and int(q.qweight.max()) <= hi
    assert q.qweight.element_size() == 1
    packed = q.packed()
    assert packed.numel() == (q.qweight.numel() // 2 if bits <= 4 else q.qweight.numel())
    assert torch.equal(QuantizedWeight.unpack(packed, bits, symmetric), q.qweight)
    torch.testing.assert_close(q.dequantize(), w, atol=float(q.scale.max()) * 0.51, rtol=0)
