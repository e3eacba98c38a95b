"""Pure tensor maths: SVD factors, truncation errors and rank measures of a spectrum.

Nothing here knows about modules or models; every function takes and returns tensors,
so the maths can be tested on bare matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "Decomposition",
    "Weight",
    "breakeven_rank",
    "decompose",
    "effective_rank",
    "energy_rank",
    "factors_from",
    "gram_factors",
    "gram_matrix",
    "gram_singular_values",
    "gram_spectrum",
    "numerical_rank",
    "participation_ratio",
    "randomized_factors",
    "resolve_device",
    "row_blocks",
    "singular_values",
    "spectral_factors",
    "stable_rank",
    "truncation_error",
    "use_randomized",
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
    return _balanced(scaled, basis, d.s[:rank], d.right)


def _balanced(
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


POWER_ITERS = 3
"""Power iterations of the randomized range finder: enough for a flat (random-weight) spectrum
at ranks up to half the smaller side (tests/test_linalg.py holds it to the optimum)."""

RANDOMIZED_MIN_SIZE = 512
"""Below this smaller side an exact decomposition is cheap: always use it."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device for the linear algebra: `device` as given, else the GPU when there is one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


RANDOMIZED_TOL = 0.01
"""A randomized factorization whose Frobenius error exceeds the Eckart-Young optimum by more
than this fraction is redone exactly (callers that know the spectrum check it)."""


RANDOMIZED_PASSES = 24
"""Cost of `randomized_factors` in units of one m x n x sketch matmul (the sketch, two per
power iteration, the projection, and the QRs, which run slower than a matmul), measured on a
CPU (2 cores, torch 2.13): 26 for 4096x4096 at rank 1024, 19 for 11008x4096 at rank 1408."""

EIGH_COST = 13
"""Cost of a float32 symmetric eigendecomposition of an s x s matrix in units of s^3 matmul
flops, measured the same way (4.7 s for s = 4096, where a 4096^3 matmul-flop takes 0.36 s)."""


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """True when `randomized_factors` is estimated to cost less than `gram_factors` (one Gram
    matrix and its eigendecomposition): only well below the layer's size, since the sketch's
    passes over the weight grow with the rank and the Gram route's cost does not."""
    big, small = max(shape), min(shape)
    if small < RANDOMIZED_MIN_SIZE:
        return False
    sketch = rank + _oversample(rank)
    randomized = RANDOMIZED_PASSES * 2 * big * small * sketch
    gram = 2 * big * small * small + EIGH_COST * small**3
    return randomized < gram


def _oversample(rank: int) -> int:
    """Generous oversampling: a flat spectrum (random weights) needs it to reach the optimum."""
    return max(16, rank // 2)


Weight = torch.Tensor | Callable[[], torch.Tensor]
"""A weight, or a function that reads it (with a `shape`, and optionally `row_blocks(rows)`
giving its rows piece by piece): then it is read when needed and not held while its Gram
matrix is decomposed (the streamed path's memory)."""


def _read(w: Weight) -> torch.Tensor:
    return w() if callable(w) else w


def gram_singular_values(w: Weight, device: str | torch.device | None = None) -> torch.Tensor:
    """All singular values of `w` (descending, float32) from the eigenvalues of the smaller
    side's Gram matrix, formed and decomposed in float32 on `device`.

    Several times faster than `singular_values` on large layers; each s_i^2 is within about
    min(shape) * eps_32 * s_1^2 of the exact value (tests hold it to 1e-5 * s_1^2), so the
    values below ~1e-3 s_1, whose energy no rank allocation can see, lose their precision.
    """
    return gram_spectrum(gram_matrix(_read(w), device)[0])


def gram_spectrum(gram: torch.Tensor) -> torch.Tensor:
    """The singular values (descending, on the CPU) of a matrix whose smaller side's Gram
    matrix is `gram`: the square roots of its eigenvalues."""
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt().cpu()


def row_blocks(w: torch.Tensor, elements: int = 1 << 20) -> tuple[torch.Tensor, ...]:
    """`w` split into blocks of whole rows of about `elements` entries each (at least one
    row): an elementwise pass in float32 or float64 then never copies a large layer whole."""
    return w.split(max(1, elements // max(w.shape[-1], 1)))


GRAM_ROWS = 1024
"""The streamed Gram route reads a weight in blocks of this many rows (of its longer side):
no float32 copy of a layer is ever held whole."""


def gram_matrix(w: Weight, device: str | torch.device | None = None) -> tuple[torch.Tensor, bool]:
    """The float32 Gram matrix of `w`'s smaller side on `device` (default: the GPU if there is
    one), summed over blocks of `GRAM_ROWS` rows of the longer side, so no float32 copy of `w`
    is made; True when that is the input side (W^T W)."""
    device = resolve_device(device)
    right = w.shape[0] >= w.shape[1]
    n = min(w.shape)
    gram = torch.zeros(n, n, device=device, dtype=torch.float32)
    for part in _side_blocks(w, right):
        block = part.to(device, torch.float32)
        gram.addmm_(block.T, block)
    return gram, right


def _side_blocks(w: Weight, right: bool) -> Iterator[torch.Tensor]:
    """Blocks of `GRAM_ROWS` rows of W (right) or of W^T. A reader whose `row_blocks(rows)`
    gives W's rows piece by piece is never read whole for W's rows."""
    pieces = getattr(w, "row_blocks", None) if right else None
    blocks = pieces(GRAM_ROWS) if pieces is not None else None
    if blocks is None:
        weight = _read(w).detach()
        blocks = (weight if right else weight.T).split(GRAM_ROWS)
    yield from blocks


def _top_eigenvectors(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The eigenvectors of the `k` largest eigenvalues of a symmetric matrix, largest first.
    On a CPU only those are computed (LAPACK's MRRR, `syevr`, through SciPy: about half of a
    full `eigh`, without its n x n workspace); `gram` is overwritten there."""
    n = gram.shape[0]
    if gram.device.type != "cpu":
        return torch.linalg.eigh(gram)[1][:, n - k :].flip(1)
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    with threadpool_limits(torch.get_num_threads(), user_api="blas"):  # torch's thread count
        _, vectors = eigh(
            gram.numpy().T,  # symmetric: the Fortran-ordered view LAPACK overwrites in place
            subset_by_index=[n - k, n - 1], driver="evr", overwrite_a=True,
            check_finite=False,
        )  # fmt: skip
    return torch.from_numpy(vectors).flip(1)


def randomized_factors(
    w: torch.Tensor,
    rank: int,
    power_iters: int = POWER_ITERS,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced rank-`rank` factors (up, down) of `w` and their singular values, by a
    randomized range finder (Halko, Martinsson & Tropp 2011, algorithm 4.4): a Gaussian
    sketch of the range, `power_iters` subspace iterations re-orthonormalised by QR, then the
    exact SVD of the small projected matrix. float32 on `device`; results on the CPU.

    W' = up @ down is an orthogonal projection of W, so ||W - W'||_F^2 = ||W||_F^2 - sum s^2.
    """
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"`rank` must be in [1, {min(w.shape)}] for shape {tuple(w.shape)}")
    dev = resolve_device(device)
    a = w.detach().to(dev, torch.float32)
    width = min(rank + _oversample(rank), min(a.shape))
    gen = torch.Generator(device=dev).manual_seed(seed)
    sketch = torch.randn(a.shape[1], width, generator=gen, device=dev)
    q = torch.linalg.qr(a @ sketch).Q  # 1) an orthonormal basis of the sketched range
    for _ in range(power_iters):  # 2) subspace iterations sharpen it towards the top
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)  # 3) exact SVD of Q^T W
    u, s, vh = q @ u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return (u * root).cpu(), (root[:, None] * vh).cpu(), s.cpu()


def gram_factors(
    w: Weight, rank: int, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (up, down) of `w` and their singular values, as `randomized_factors`
    returns them, from the top eigenvectors of the smaller side's float32 Gram matrix (on
    `device`; results on the CPU). On a CPU this costs a quarter to a half of a float32 SVD.
    Memory: `w`, the Gram matrix, and the factors in float32; `w` is converted a block of rows
    at a time, and when it is a function that reads it, it is read twice (for the Gram and
    for W V) and not held in between.

    The factors are W V V^T (or U U^T W) for an orthonormal V: an orthogonal projection of W,
    so ||W - up @ down||_F^2 = ||W||_F^2 - sum s^2 with s the column norms of W V. Vectors of
    nearly equal eigenvalues may mix (float32), which costs almost nothing in that error;
    callers that know the spectrum compare it with the optimum.
    """
    shape = tuple(w.shape)
    if not 1 <= rank <= min(shape):
        raise ValueError(f"`rank` must be in [1, {min(shape)}] for shape {shape}")
    dev = resolve_device(device)
    gram, right = gram_matrix(w, dev)
    basis = _top_eigenvectors(gram, rank).to(dev)
    del gram
    scaled = torch.empty(max(shape), rank, device=dev, dtype=torch.float32)
    start = 0
    for part in _side_blocks(w, right):
        torch.mm(part.to(dev, torch.float32), basis, out=scaled[start : start + len(part)])
        start += len(part)
    s = torch.linalg.vector_norm(scaled, dim=0)  # U_k S_k (out x k) or V_k S_k (in x k)
    up, down = _balanced(scaled if right else scaled.T, basis, s, right)
    return up.cpu().contiguous(), down.cpu().contiguous(), s.cpu()


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
