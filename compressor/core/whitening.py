"""Activation-aware (whitened) truncation on bare tensors: a layer input's Gram matrix, its
whitener, and the truncation of W L that minimises the error on the layer's outputs.

With X the calibration inputs of a layer (rows are samples) and G = X^T X = L L^T, the
rank-k W' minimising ||(W - W') X^T||_F is W' = trunc_k(W L) L^+, and its error is exactly
sqrt(sum_{i>k} s_i(W L)^2) (docs/method.md section 4).

Numerics: G is often singular (dead features, fewer samples than the width). L is the
Cholesky factor of G + damping * mean(diag G) * I (positive definite whenever damping > 0),
in float64 or, for a large layer's float32 Gram, in float32; without one (damping 0 and G
singular) it comes from a symmetric eigen-decomposition, and L^+ drops the eigen-directions
at round-off level (`Whitener.from_gram`). Damping also keeps the
weight's behaviour on directions the calibration data never excites (it adds
damping * mean(diag G) * ||W - W'||_F^2 to the objective); `damping=0` is the exact optimum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from compressor.core.gram import gram_factors, rows_gram, symmetric_eigen, times_lower
from compressor.core.linalg import balanced_factors, decompose, factors_from, singular_values

__all__ = [
    "DEFAULT_DAMPING",
    "LayerStats",
    "Whitener",
    "whitened_factors",
    "whitened_gram_factors",
    "whitened_spectrum",
    "whiteners",
]

DEFAULT_DAMPING = 1e-2
"""Relative damping: a multiple of the Gram matrix's mean diagonal added to its diagonal."""


@dataclass
class LayerStats:
    """The running Gram matrix of one layer input; `rows` is the number of input vectors."""

    gram: torch.Tensor  # d_in x d_in, sum over rows of x x^T: float64 (or float32 if asked)
    rows: int = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add the rows of `x` (any leading shape): their product in float32 (several times
        faster than float64 on a CPU; each batch's sum is within ~rows * eps_32 of exact;
        `rows_gram`), summed into the float64 total."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += rows_gram(x)
        self.rows += x.shape[0]


@dataclass(frozen=True)
class Whitener:
    """A square root L of a (damped) Gram matrix: its Cholesky factor (float64, or float32
    from a float32 Gram matrix), whose inverse is never formed unless asked for (`root_pinv`):
    `unwhiten` solves with the triangle instead; or, where there is no Cholesky factor, the
    eigen-root and its pseudo-inverse (`from_gram`)."""

    root: torch.Tensor  # d x d, root @ root.T == G + damping * mean(diag G) * I
    pinv: torch.Tensor | None = None  # d x d, the pseudo-inverse of `root`; None when `lower`
    lower: bool = False  # `root` is lower triangular (a Cholesky factor)

    def __post_init__(self) -> None:
        if (self.pinv is None) != self.lower:
            raise ValueError("a Whitener holds its pseudo-inverse exactly when it is not lower")

    @property
    def root_pinv(self) -> torch.Tensor:
        """L^+ as a matrix (solved from the triangle each time for the Cholesky factor)."""
        if self.pinv is not None:
            return self.pinv
        eye = torch.eye(self.root.shape[0], dtype=self.root.dtype, device=self.root.device)
        return torch.linalg.solve_triangular(self.root, eye, upper=False)

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        """W L in float32 (a float32 triangular L: half the flops of a product on a CPU)."""
        if self.lower and self.root.dtype == torch.float32:
            return times_lower(w, self.root)
        return w.float() @ self.root.float()

    def inverse_t(self, m: torch.Tensor) -> torch.Tensor:
        """M (L^+)^T in float64: for the Cholesky factor a triangular solve with M's rows."""
        m = m.double()
        if self.lower:
            return torch.linalg.solve_triangular(self.root.double().T, m, upper=True, left=False)
        return m @ self.pinv.double().T

    def unwhiten(self, x: torch.Tensor) -> torch.Tensor:
        """X L^+ in X's dtype: for the Cholesky factor a triangular solve with X's k rows
        (k d^2 flops, where forming L^-1 alone costs d^3 / 3 and a d x d matrix)."""
        if self.lower:
            root = self.root.to(x.dtype)
            return torch.linalg.solve_triangular(root, x, upper=False, left=False)
        return x @ self.root_pinv.to(x.dtype)

    @classmethod
    def from_gram(cls, gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Whitener | None:
        """None when the Gram matrix is zero (no calibration signal): fall back to plain SVD.

        A float64 (or any non-float32) `gram` gives the float64 Cholesky factor of the damped
        matrix (a 1536-wide one in a hundredth of the time of its eigendecomposition), or,
        without one (damping 0 and G singular), L = Q Lambda^1/2 from `eigh` and a
        pseudo-inverse that drops what is numerically zero.

        A float32 `gram` (a large layer's, 11008 x 11008 on Llama-7B) is overwritten, as
        LAPACK's inputs are: L is the Cholesky factor of the damped matrix (positive definite
        whenever `damping` > 0), 3 s on 2 cores at n = 11008, where the float32
        eigendecomposition took 63 s; the input's memory is released after it. Any root of G
        serves: the truncation of W L then times L^-1 is the same for every L with L L^T = G.
        Without a Cholesky factor (damping 0 and G singular in float32) it is decomposed in
        float32 (`gram.symmetric_eigen`)."""
        if damping < 0:
            raise ValueError(f"`damping` must be >= 0, got {damping}")
        single = gram.dtype == torch.float32
        d = gram.shape[0]
        mean_diag = float(gram.diagonal().double().mean())
        if not mean_diag > 0.0:
            return None
        scale = mean_diag**0.5
        if single:  # scaled and damped in place
            g = gram.detach().div_(mean_diag)
            g.diagonal().add_(damping)
            root, info = torch.linalg.cholesky_ex(g)
            if int(info) == 0:
                return cls(root.mul_(scale), lower=True)
            del root
            lam, q = symmetric_eigen(g, d)
            del g
        else:
            g = gram.detach().double()
            g = (g + g.T) / 2 / mean_diag  # scale-free: the factors do not depend on it
            g.diagonal().add_(damping)
            if damping > 0:
                root, info = torch.linalg.cholesky_ex(g)
                if int(info) == 0:
                    return cls(root.mul_(scale), lower=True)
            lam, q = torch.linalg.eigh(g)
        lam = lam.to(q.device).clamp(min=0.0)
        alive = lam > float(lam.max()) * d * torch.finfo(q.dtype).eps
        root_lam = lam.sqrt()
        inv = torch.where(alive, 1.0 / root_lam.where(alive, torch.ones_like(lam)), 0.0)
        return cls(root=q * (root_lam * scale), pinv=(q * (inv / scale)).T)


def whitened_spectrum(w: torch.Tensor, whitener: Whitener | None) -> torch.Tensor:
    """Singular values of W L (plain singular values of W when there is no whitener), float64
    (`linalg.singular_values`: an elongated W L through its small Gram matrix)."""
    w64 = w.detach().double()
    return singular_values(w64 if whitener is None else w64 @ whitener.root.double())


def whitened_factors(
    w: torch.Tensor, whitener: Whitener | None, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-`rank` factors `up` (out x k), `down` (k x in) with W' = up @ down minimising
    ||(W - W') L||_F, in float64.

    Returns (up, down, error, relative error): error = ||(W - W') L||_F, which equals
    sqrt(sum_{i>k} s_i(W L)^2), and relative error = error / ||W L||_F. Without a whitener
    this is the plain truncated SVD and its weight error.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"`rank` must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    w64 = w.detach().double()
    target = w64 if whitener is None else w64 @ whitener.root.double()
    decomposition = decompose(target, rank)  # an elongated W L: its small Gram's eigenvectors
    s = decomposition.s
    up, down = factors_from(target, decomposition, rank)
    if whitener is not None:
        down = whitener.unwhiten(down)
    error = float(s[rank:].square().sum().sqrt())
    total = float(s.square().sum().sqrt())
    return up, down, error, error / total if total > 0 else 0.0


def whitened_gram_factors(
    w: torch.Tensor, whitener: Whitener, rank: int, basis: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`whitened_factors` in float32 by the Gram route (`gram.gram_factors` on W L, then the
    down factor times L^+): (up, down, the kept singular values of W L). W' = up @ down is
    the projection of W L onto its top singular vectors, so ||(W - W') L||_F^2 =
    ||W L||_F^2 - sum s^2: callers compare it with the optimum.

    With `basis` (the top singular vectors of W L's smaller side, as `gram_decomposition`
    returns them) W L is never formed: W (L V) and V^T L^+ (V on the input side), or U^T W
    and, for s, (U^T W) L (U on the output side), a fraction of W L's cost on a wide layer."""
    if basis is None:
        up, down, s = gram_factors(whitener.whiten(w), rank)
        return up, whitener.unwhiten(down), s
    w = w.float()
    v = basis[:, :rank].float()
    if w.shape[0] >= w.shape[1]:  # W L V = U S
        scaled = w @ (whitener.root @ v)
        s = torch.linalg.vector_norm(scaled, dim=0)
        up, down = balanced_factors(scaled, v, s, right=True)
        return up, whitener.unwhiten(down), s
    projected = v.T @ w  # U^T W: W' = U U^T W
    s = torch.linalg.vector_norm(whitener.whiten(projected), dim=1)
    up, down = balanced_factors(projected, v, s, right=False)
    return up, down, s


def whiteners(stats: Mapping[str, LayerStats], damping: float) -> dict[str, Whitener | None]:
    """One whitener per distinct Gram matrix (q/k/v share theirs, so one decomposition)."""
    by_id: dict[int, Whitener | None] = {}
    out = {}
    for name, st in stats.items():
        if id(st) not in by_id:
            by_id[id(st)] = Whitener.from_gram(st.gram / max(st.rows, 1), damping)
        out[name] = by_id[id(st)]
    return out
