"""Each profiling metric on hand-made tensors whose answer is known by hand (metrics.md definitions)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from sinkquant.profiling import metrics


def test_massive_needs_both_100_and_1000x_median() -> None:
    h = torch.full((4, 4), 0.1)
    h[0, 2] = 150.0  # > 100 and 1500x the median 0.1
    h[3, 1] = 99.0  # 990x the median but not > 100
    assert torch.equal(torch.nonzero(metrics.massive_mask(h, h.median())), torch.tensor([[0, 2]]))
    assert not metrics.massive_mask(torch.tensor([150.0]), 1.0).any()  # only 150x a median of 1


def test_top_entries_give_position_and_channel() -> None:
    h = torch.zeros(3, 5)
    h[2, 4], h[0, 1], h[1, 3] = 9.0, 7.0, 5.0
    values, positions, channels = metrics.top_entries(h, 3)
    assert values.tolist() == [9.0, 7.0, 5.0]
    assert positions.tolist() == [2, 0, 1]
    assert channels.tolist() == [4, 1, 3]


def test_token_outlier_ratio_eta_64() -> None:
    token_max = torch.tensor([640.0, 1.0, 1.0, 2.0, 1.0])
    assert metrics.token_outlier_ratio(token_max)[0] == pytest.approx(640.0)
    assert metrics.outlier_tokens(token_max).tolist() == [True, False, False, False, False]
    assert not metrics.outlier_tokens(torch.tensor([64.0, 1.0, 1.0])).any()  # r = 64 is not > 64


def test_prefix_length_and_ids_follow_prefixquant() -> None:
    # per sequence, max over layers: 2 and 3 -> mean 2.5 -> ceil 3
    assert metrics.prefix_length([[0, 2, 1], [3, 1, 0]]) == 3
    assert metrics.prefix_length([]) == 0
    counts = Counter({13: 5, 11: 5, 7: 2, 1: 9})
    assert metrics.prefix_ids(counts, 2, bos_id=1) == [1, 11, 13]  # BOS first, ties on the smaller id
    assert metrics.prefix_ids(counts, 2, bos_id=None) == [1, 11]
    assert metrics.prefix_ids(counts, 0, bos_id=1) == [1]


def test_systematic_outliers_and_buckets() -> None:
    h = torch.ones(4, 10) * 0.01
    h[1, 3] = 200.0  # mean |h| ~ 5.0, threshold ~ 5000: not flagged
    assert not metrics.systematic_outliers(h).any()
    h = torch.ones(1000, 10) * 0.01
    h[7, 0] = 2000.0  # mean |h| = 0.21, threshold 210
    assert torch.nonzero(metrics.systematic_outliers(h)).flatten().tolist() == [7]
    assert metrics.token_bucket("Hello", 0) == "initial"
    assert metrics.token_bucket(" .", 5) == "delimiter"
    assert metrics.token_bucket("\n", 5) == "delimiter"
    assert metrics.token_bucket(" The", 5) == "weak_semantic"
    assert metrics.token_bucket(" castle", 5) == "other"


def _uniform_causal(t: int) -> torch.Tensor:
    return torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]


def test_column_mean_on_uniform_causal_attention() -> None:
    cols = metrics.column_mean(_uniform_causal(4))
    assert cols[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert cols[3] == pytest.approx(1 / 4)  # one query (t = 3) sees key 3 with 1/4
    assert cols[2] == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_sink_rate_is_a_share_of_heads() -> None:
    alpha = torch.tensor([[0.9, 0.1], [0.5, 0.2]])
    assert metrics.sink_rate(alpha, 0.3) == pytest.approx(50.0)
    assert metrics.sink_rate(alpha, 0.8) == pytest.approx(25.0)


def test_row_entropy_and_dormant_heads() -> None:
    attn = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert metrics.row_entropy(attn).tolist() == pytest.approx([0.0, math.log(4)])
    alpha0 = torch.tensor([[0.95, 0.95, 0.5]])
    entropy = torch.tensor([[0.1, 2.0, 0.1]])
    assert metrics.dormant_heads(alpha0, entropy).tolist() == [[True, False, False]]


def test_value_drain_and_norm_peak() -> None:
    v = torch.ones(2, 5, 4)  # heads, T, D: norm 2 everywhere
    v[0, 0] = 0.1  # head 0's sink value is small: norm 0.2
    assert metrics.value_drain(v).tolist() == pytest.approx([0.1, 1.0])
    h = torch.ones(5, 4)
    h[0] = 100.0
    assert metrics.norm_peak(h) == pytest.approx(100.0)


def test_kurtosis_is_not_excess_and_streams() -> None:
    x = torch.tensor([-1.0, 1.0] * 50)
    assert metrics.kurtosis(x) == pytest.approx(1.0 / (1.0 + 1e-6))
    y = torch.zeros(1000)
    y[0] = 10.0  # one spike: kurtosis ~ n
    k = metrics.kurtosis(y)
    assert 900 < k < 1000
    a, b = torch.randn(300), torch.randn(500) * 3 + 1
    streamed = metrics.kurtosis_from_sums(metrics.power_sums(a) + metrics.power_sums(b))
    assert streamed == pytest.approx(metrics.kurtosis(torch.cat([a, b])), rel=1e-4)


def test_llm_int8_outlier_columns_threshold_6() -> None:
    assert metrics.int8_outlier_columns(torch.tensor([1.0, 6.0, 5.99, 7.0])).tolist() == [1, 3]


def test_token_quant_error_per_tensor_and_per_token() -> None:
    x = torch.tensor([[1.0, 0.4], [0.6, -0.2]])  # 2 bits: qmax 1
    per_tensor = metrics.token_quant_error(x, 2, x.abs().max())  # scale 1: Q = [[1, 0], [1, 0]]
    assert per_tensor.tolist() == pytest.approx([0.16, 0.20])
    per_token = metrics.token_quant_error(x, 2, x.abs().amax(dim=-1, keepdim=True))  # row 1: scale 0.6
    assert per_token.tolist() == pytest.approx([0.16, 0.04])
    x8 = torch.randn(16, 32)
    scale = x8.abs().max() / 127
    reference = ((x8 / scale).round() * scale - x8).square().sum(-1)
    assert torch.allclose(metrics.token_quant_error(x8, 8, x8.abs().max()), reference, rtol=1e-4, atol=1e-9)


def test_topk_shares() -> None:
    assert metrics.topk_shares(torch.tensor([1.0, 6.0, 3.0]), (1, 2, 3)) == pytest.approx([0.6, 0.9, 1.0])
    assert metrics.topk_shares(torch.zeros(3), (1, 2)) == [0.0, 0.0]


def test_stretch_with_and_without_sinks() -> None:
    token_max = torch.tensor([100.0, 2.0, 3.0])
    assert metrics.stretch(token_max, torch.tensor([True, False, False])) == (100.0, 3.0)
    assert metrics.stretch(token_max, torch.tensor([False, False, False])) == (100.0, 100.0)
