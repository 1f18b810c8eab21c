"""Hadamard constructions are exact (H H^T = n I in integers) and the rotations built from them orthogonal."""

from __future__ import annotations

import pytest
import torch

from sinkquant.errors import SinkquantError
from sinkquant.quant.hadamard import hadamard, orthogonal, paley1, paley2, rotation_kind, sylvester

# SmolLM2's hidden width and MLP width, head dims, and tiny-model widths.
WIDTHS = [1, 2, 4, 12, 20, 28, 36, 64, 128, 256, 576, 1536, 768, 896]


@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_is_exact_before_normalisation(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize(("build", "q", "order"), [(paley1, 11, 12), (paley1, 19, 20), (paley2, 17, 36),
                                                   (paley2, 5, 12), (paley2, 13, 28)])
def test_paley_constructions(build, q, order):
    h = build(q)
    assert h.shape == (order, order)
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_the_widths_smollm2_needs_use_hadamard():
    assert rotation_kind(576) == "hadamard paley2(17) x sylvester(16)"
    assert rotation_kind(1536) == "hadamard paley1(11) x sylvester(128)"
    assert rotation_kind(64) == "hadamard sylvester(1) x sylvester(64)"


@pytest.mark.parametrize("n", [576, 1536, 64, 50, 7])
def test_rotations_are_orthogonal_and_seeded(n):
    q = orthogonal(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal(n, seed=3))
    if hadamard(n) is not None:
        assert not torch.equal(q, orthogonal(n, seed=4))  # random signs differ
        assert torch.allclose(q.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))


def test_fallback_is_named_and_random():
    assert hadamard(50) is None and hadamard(7) is None
    assert rotation_kind(50).startswith("random orthogonal")
    assert not torch.allclose(orthogonal(50, seed=0), orthogonal(50, seed=1))


def test_a_hadamard_rotation_spreads_an_outlier():
    x = torch.zeros(576, dtype=torch.float64)
    x[507] = 24000.0
    rotated = x @ orthogonal(576, seed=0)
    assert torch.allclose(rotated.abs(), torch.full((576,), 24000.0 / 24.0, dtype=torch.float64))


@pytest.mark.parametrize("call", [lambda: sylvester(12), lambda: orthogonal(0, seed=0)])
def test_bad_widths_are_sinkquant_errors(call):
    with pytest.raises(SinkquantError):
        call()
