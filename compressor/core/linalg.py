"""Pure tensor maths: SVD factors, truncation errors and rank measures of a spectrum (the
float32 Gram route and the randomized SVD for large weights: `compressor.core.gram`).

Nothing here knows about modules or models; every function takes and returns tensors,
so the maths can be tested on bare matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Decomposition",
    "balanced_factors",
    "breakeven_rank",
    "decompose",
    "effective_rank",
    "energy_rank",
    "factors_from",
    "floor_breakeven",
    "numerical_rank",
    "participation_ratio",
    "row_blocks",
    "singular_values",
    "spectral_factors",
    "stable_rank",
    "truncation_error",
]


def _work_dtype(w: torch.Tensor) -> torch.dtype:
    """SVDs run in float64 for float64 input, float32 otherwise (never fp16/bf16)."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _is_elongated(w: torch.Tensor) -> bool:
    """Tall or wide enough (aspect >= 2) that the Gram route beats a full SVD."""
    return max(w.shape) >= 2 * min(w.shape)


def _small_gram(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The Gram matrix of the smaller side, in float64, and whether it is W^T W (right side)."""
    w64 = w.detach().double()
    right = w.shape[0] >= w.shape[1]
    return (w64.T @ w64 if right else w64 @ w64.T), right


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, descending, in float32/float64 (never fp16/bf16).

    Elongated matrices (an MLP's 3072x768) go through the eigenvalues of their small float64
    Gram matrix, several times faster than an SVD on a CPU and accurate to ~1e-8 * s_1.
    """
    if not _is_elongated(w):
        return torch.linalg.svdvals(w.detach().to(_work_dtype(w)))
    gram, _ = _small_gram(w)
    values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
    return values.to(_work_dtype(w))


@dataclass
class Decomposition:
    """A weight's singular values and the top singular vectors of its smaller side."""

    s: torch.Tensor  # all singular values, descending
    basis: torch.Tensor  # V_m (in x m) when right, U_m (out x m) otherwise
    right: bool

    @property
    def kept(self) -> int:
        return self.basis.shape[1]


def decompose(w: torch.Tensor, keep: int | None = None) -> Decomposition:
    """Singular values and the top `keep` (default all) singular vectors of the smaller side,
    enough to rebuild any factorization of rank <= keep with `factors_from`."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    keep = min(w.shape) if keep is None else keep
    right = w.shape[0] >= w.shape[1]
    if _is_elongated(w):
        gram, _ = _small_gram(w)
        values, vectors = torch.linalg.eigh(gram)
        s, basis = values.flip(0).clamp_min(0).sqrt(), vectors.flip(1)
    else:
        u, s, vh = torch.linalg.svd(w.detach().to(_work_dtype(w)), full_matrices=False)
        basis = vh.T if right else u
    dtype = _work_dtype(w)
    return Decomposition(s.to(dtype), basis[:, :keep].to(dtype).contiguous(), right)


def factors_from(w: torch.Tensor, d: Decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-`rank` factors (up = U_k S_k^(1/2), down = S_k^(1/2) V_k^T) of `w`,
    rebuilt from one side's singular vectors: U_k S_k = W V_k, and S_k V_k^T = U_k^T W."""
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"`rank` must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    if rank > d.kept:
        d = decompose(w, rank)
    wk = w.detach().to(_work_dtype(w))
    basis = d.basis[:, :rank]
    scaled = wk @ basis if d.right else basis.T @ wk
    return balanced_factors(scaled, basis, d.s[:rank], d.right)


def balanced_factors(
    scaled: torch.Tensor, basis: torch.Tensor, s: torch.Tensor, right: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_k S_k^(1/2), S_k^(1/2) V_k^T) from one side's orthonormal `basis` and
    `scaled` = W V_k = U_k S_k (right) or U_k^T W = S_k V_k^T; zero values give zero factors."""
    root = s.sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.clamp_min(1e-30), torch.zeros_like(root))
    if right:  # in place: `scaled` is the caller's scratch, and a layer-sized one
        return scaled.mul_(inv_root), root[:, None] * basis.T
    return basis * root, scaled.mul_(inv_root[:, None])


def spectral_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of `w` (out x in): `w ~ up @ down`.

    up = U_k S_k^(1/2) (out x k) and down = S_k^(1/2) V_k^T (k x in), the balanced split,
    computed in float32 (float64 for float64 input) and returned in that precision.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"`rank` must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    return factors_from(w, decompose(w, rank), rank)


def row_blocks(w: torch.Tensor, elements: int = 1 << 20) -> tuple[torch.Tensor, ...]:
    """`w` split into blocks of whole rows of about `elements` entries each (at least one
    row): an elementwise pass in float32 or float64 then never copies a large layer whole."""
    return w.split(max(1, elements // max(w.shape[-1], 1)))


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
