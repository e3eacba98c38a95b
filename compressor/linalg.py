"""Pure tensor maths: SVD factors, truncation errors and rank measures of a spectrum.

Nothing here knows about modules or models; every function takes and returns tensors,
so the maths can be tested on bare matrices.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "breakeven_rank",
    "effective_rank",
    "energy_rank",
    "numerical_rank",
    "participation_ratio",
    "singular_values",
    "spectral_factors",
    "stable_rank",
    "truncation_error",
]


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    """SVDs run in float64 for float64 input, float32 otherwise (never fp16/bf16)."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, descending, computed in float32/float64."""
    return torch.linalg.svdvals(w.detach().to(_work_dtype(w)))


def spectral_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `w` (out x in): `w ~ up @ down`.

    up = U_k S_k^(1/2) (out x k) and down = S_k^(1/2) V_k^T (k x in), the balanced split,
    computed in float32 (float64 for float64 input) and returned in that precision.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"`rank` must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    u, s, vh = torch.linalg.svd(w.detach().to(_work_dtype(w)), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """Frobenius error of the best rank-`rank` approximation (Eckart-Young)."""
    return float(s[rank:].double().square().sum().sqrt())


def energy_rank(s: torch.Tensor, tau: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= tau * sum s_i^2 (0 for a zero spectrum)."""
    energy = s.double().square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = energy.cumsum(0) / total
    return min(int((cumulative < tau - 1e-12).sum()) + 1, s.numel())


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = s_i / sum s_j."""
    s = s.double()
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """||X||_F^2 / ||X||_2^2."""
    s = s.double()
    return 0.0 if float(s[0]) == 0.0 else float(s.square().sum() / s[0] ** 2)


def participation_ratio(s: torch.Tensor) -> float:
    """(sum s^2)^2 / sum s^4."""
    e = s.double().square()
    denom = float(e.square().sum())
    return 0.0 if denom == 0.0 else float(e.sum() ** 2 / denom)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], eps: float | None = None) -> int:
    """#{s_i > s_1 * max(shape) * eps}, eps the machine epsilon of float32 by default."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return int((s > s[0] * max(shape) * eps).sum())


def breakeven_rank(out_features: int, in_features: int) -> float:
    """Rank k* where k * (in + out) = in * out: at or above it a factorization is no smaller."""
    return out_features * in_features / (out_features + in_features)


def floor_breakeven(out_features: int, in_features: int) -> int:
    """Largest integer rank that is still strictly smaller than the dense layer."""
    return math.ceil(breakeven_rank(out_features, in_features)) - 1
