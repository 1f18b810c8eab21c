"""Hadamard matrices of order K * 2^m and the orthogonal rotations built from them (QuaRot / SpinQuant).

A Hadamard rotation spreads an outlier channel evenly over all channels, so a per-tensor or per-token grid is
no longer stretched by it. Powers of two come from Sylvester's doubling; widths that are not (576 = 36 * 16 in
SmolLM2, 1536 = 12 * 128) from a Paley construction of the odd part K times a Sylvester matrix:

    Paley I   q prime, q = 3 (mod 4): order q + 1      (q = 11 gives 12, q = 19 gives 20, q = 43 gives 44)
    Paley II  q prime, q = 1 (mod 4): order 2 (q + 1)  (q = 5 gives 12, q = 13 gives 28, q = 17 gives 36)

Any other width falls back to a seeded random orthogonal matrix (QR of a Gaussian), which rotates exactly as
well in floating point but spreads outliers only on average; `rotation_kind` says which one a width gets."""

from __future__ import annotations

import math

import torch

from sinkquant.errors import SinkquantError


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i): the quadratic character of GF(q), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[index]


def paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 (mod 4): H = I + S, S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 (mod 4): every entry of the symmetric conference matrix C =
    [[0, 1^T], [1, Q]] becomes a 2x2 block, [[1, -1], [-1, -1]] for 0 and +-[[1, 1], [1, -1]] otherwise."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0] = 1.0, 1.0
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


def sylvester(n: int) -> torch.Tensor:
    """Order n = 2^m: H_2n = [[H, H], [H, -H]]."""
    if n < 1 or n & (n - 1):
        raise SinkquantError(f"Sylvester Hadamard order n={n} is not valid; valid: a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _base(k: int) -> tuple[str, torch.Tensor] | None:
    """A Hadamard matrix of order k (1, 2 or a multiple of 4) by Paley I or II, if q is prime."""
    if k in (1, 2):
        return f"sylvester({k})", sylvester(k)
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return f"paley1({k - 1})", paley1(k - 1)
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return f"paley2({k // 2 - 1})", paley2(k // 2 - 1)
    return None


def _construction(n: int) -> tuple[str, int, torch.Tensor] | None:
    """(name, 2^m, base) with n = len(base) * 2^m, largest power of two first."""
    if n < 1:
        return None
    power = n & -n  # the largest power of two dividing n
    while power >= 1:
        found = _base(n // power)
        if found is not None:
            return f"{found[0]} x sylvester({power})", power, found[1]
        power //= 2
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An n x n matrix of +-1 (float64) with H H^T = n I, or None when no construction here reaches n."""
    found = _construction(n)
    if found is None:
        return None
    _, power, base = found
    return torch.kron(base, sylvester(power))


def rotation_kind(n: int) -> str:
    """Which matrix `orthogonal(n, ...)` builds, e.g. 'hadamard paley2(17) x sylvester(16)'."""
    found = _construction(n)
    return f"hadamard {found[0]}" if found is not None else "random orthogonal (no Hadamard construction)"


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed orthogonal matrix (float64) from a seeded Gaussian's QR, signs fixed by R's diagonal."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def orthogonal(n: int, seed: int, random_signs: bool = True) -> torch.Tensor:
    """The float64 n x n rotation used for width n: H / sqrt(n), with QuaRot's random +-1 flip of each row
    (seeded) unless `random_signs` is off; a seeded random orthogonal matrix where no Hadamard exists."""
    if n < 1:
        raise SinkquantError(f"rotation width n={n} is not valid; valid: a positive integer")
    h = hadamard(n)
    if h is None:
        return random_orthogonal(n, seed)
    h = h / math.sqrt(n)
    if random_signs:
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        h = signs[:, None] * h
    return h
