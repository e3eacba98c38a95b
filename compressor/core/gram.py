"""The float32 Gram route for large weights: the smaller side's Gram matrix formed a block of
rows at a time (BLAS `syrk`), its eigendecomposition through a kept tridiagonal reduction
(`Tridiagonal`), factors from its top eigenvectors, and the randomized SVD beside it, with the
cost model that picks between them (`use_randomized`).

Pure tensor maths on the CPU or a GPU: nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from compressor.core.linalg import Decomposition, balanced_factors

__all__ = [
    "BLOCK_ELEMENTS",
    "EIGH_COST",
    "GRAM_BAND",
    "POWER_ITERS",
    "RANDOMIZED_MIN_SIZE",
    "RANDOMIZED_PASSES",
    "RANDOMIZED_TOL",
    "Tridiagonal",
    "Weight",
    "gram_decomposition",
    "gram_factors",
    "gram_matrix",
    "gram_singular_values",
    "gram_tridiagonal",
    "randomized_factors",
    "resolve_device",
    "rows_gram",
    "symmetric_eigen",
    "times_lower",
    "use_randomized",
]


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


RANDOMIZED_PASSES = 12
"""Cost of `randomized_factors` in units of one m x n x sketch product (2 m n sketch flops:
the sketch, two per power iteration, the projection, and the QRs, which run slower than a
product), measured on a CPU (2 cores, torch 2.13, bf16 weights): 11-13 for 4096x4096 at ranks
256-512 and 11008x4096 at 256-512, 20 for 4096x4096 at 1024."""

EIGH_COST = 5.5
"""Cost of the Gram route's decomposition (`Tridiagonal`: reduction, T's eigenvectors, k of
them carried back) and W V, in units of s^3 product flops for an s x s Gram matrix, measured
the same way: 2.7-3.0 s for s = 4096, where a 4096^3 product takes 0.85 s."""


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """True when `randomized_factors` is estimated to cost less than `gram_factors` (one Gram
    matrix, a `syrk`: big x small^2 flops, and its decomposition): only well below the layer's
    size, since the sketch's passes over the weight grow with the rank and the Gram route's
    cost does not. Measured: randomized 0.9 / 2.1 s against 2.7 / 2.8 s on 4096x4096 at ranks
    256 / 512, 2.1 s against 3.4 s on 11008x4096 at 256; 6.5 against 3.0 s at 1024 on the
    former, 4.8 against 3.7 s at 512 on the latter."""
    big, small = max(shape), min(shape)
    if small < RANDOMIZED_MIN_SIZE:
        return False
    sketch = rank + _oversample(rank)
    randomized = RANDOMIZED_PASSES * 2 * big * small * sketch
    gram = big * small * small + EIGH_COST * small**3
    return randomized < gram


def _oversample(rank: int) -> int:
    """Generous oversampling: a flat spectrum (random weights) needs it to reach the optimum."""
    return max(16, rank // 2)


Weight = torch.Tensor | Callable[[], torch.Tensor]
"""A weight, or a function that reads it (with a `shape`, and optionally `row_blocks(rows)` and
`column_blocks(columns)` giving W's rows and W^T's rows piece by piece): then it is read when
needed, never whole, and not held while its Gram matrix is decomposed (the streamed path)."""


def _read(w: Weight) -> torch.Tensor:
    return w() if callable(w) else w


def gram_singular_values(w: Weight, device: str | torch.device | None = None) -> torch.Tensor:
    """All singular values of `w` (descending, float32) from the eigenvalues of the smaller
    side's Gram matrix, formed and decomposed in float32 on `device`.

    Several times faster than `singular_values` on large layers; each s_i^2 is within about
    min(shape) * eps_32 * s_1^2 of the exact value (tests hold it to 1e-5 * s_1^2), so the
    values below ~1e-3 s_1, whose energy no rank allocation can see, lose their precision.
    """
    return gram_decomposition(w, 0, device).s


def gram_decomposition(
    w: Weight, keep: int, device: str | torch.device | None = None
) -> Decomposition:
    """`decompose` from the smaller side's float32 Gram matrix (on `device`; results on the
    CPU): all singular values, and the top `keep` singular vectors of that side (none for
    `keep=0`), from one eigendecomposition. Precision as `gram_singular_values`'."""
    gram, right = _finite_gram(w, resolve_device(device))
    values, vectors = symmetric_eigen(gram, keep)
    basis = vectors.cpu() if vectors is not None else torch.zeros(len(values), 0)
    return Decomposition(values.clamp_min(0).sqrt(), basis, right)


def gram_tridiagonal(w: Weight) -> tuple[Tridiagonal, bool]:
    """`gram_decomposition` stopped half-way, on the CPU: the smaller side's float32 Gram
    matrix reduced to tridiagonal form (its eigenvalues are the squared singular values; its
    `eigen(k)` gives the basis `gram_factors` takes), and True when it is W^T W."""
    gram, right = _finite_gram(w, torch.device("cpu"))
    if len(gram) < 2:
        raise ValueError("a tridiagonal reduction needs a smaller side of at least 2")
    return Tridiagonal.of(gram), right


def _finite_gram(w: Weight, device: torch.device) -> tuple[torch.Tensor, bool]:
    """`gram_matrix` (upper triangle), checked: its diagonal sums the squares of every entry."""
    gram, right = gram_matrix(w, device, full=False)
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise ValueError("the weight has NaN/Inf entries, or entries too large for float32")
    return gram, right


BLOCK_ELEMENTS = 1 << 22
"""The Gram route reads a weight in blocks of whole rows (of W, or of W^T) of about this many
entries (16 MB in float32; 1024 rows of a 4096-wide matrix): no float32 copy of a layer is
ever held whole."""


def gram_matrix(
    w: Weight, device: str | torch.device | None = None, full: bool = True
) -> tuple[torch.Tensor, bool]:
    """The float32 Gram matrix of `w`'s smaller side on `device` (default: the GPU if there is
    one), summed over blocks of whole rows of the longer side (`BLOCK_ELEMENTS`), so no
    float32 copy of `w` is made; True when that is the input side (W^T W). On a CPU each
    block is a symmetric rank-k update (BLAS `syrk`: half the flops of a product), then the
    triangle is mirrored, unless `full` is False: then only the upper triangle is filled
    (LAPACK's lower one), as the decompositions here read it. Every Gram matrix of this
    module is formed here."""
    device = resolve_device(device)
    right = w.shape[0] >= w.shape[1]
    n = min(w.shape)
    gram = torch.zeros(n, n, device=device, dtype=torch.float32)
    if device.type == "cpu":
        _syrk_into(gram, _side_blocks(w, right))
        if full:
            _mirror_upper(gram)
        return gram, right
    for part in _side_blocks(w, right):
        block = part.to(device, torch.float32)
        gram.addmm_(block.T, block)
    return gram, right


GRAM_BAND = 256
"""`rows_gram` forms the upper triangle this many columns at a time."""


def rows_gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X of a rows x n matrix, in its dtype and on its device: the upper triangle a band of
    `GRAM_BAND` columns at a time (the band's product with the columns from it on), then
    mirrored. A calibration batch's Gram (`LayerStats.add`) at about 0.7x the time of
    `x.T @ x` (n 576 to 4096, 3584 rows, float32, 2 CPU threads: 10 / 69 / 470 ms against
    14 / 93 / 695 at n 576 / 1536 / 4096); SciPy's `syrk` was slower below n 1536."""
    n = x.shape[1]
    gram = x.new_empty(n, n)
    for a in range(0, n, GRAM_BAND):
        gram[a : a + GRAM_BAND, a:] = x[:, a : a + GRAM_BAND].T @ x[:, a:]
    _mirror_upper(gram)
    return gram


def _syrk_into(gram: torch.Tensor, blocks: Iterator[torch.Tensor]) -> None:
    """gram's upper triangle += that of sum B^T B over `blocks` (each rows x n), through BLAS
    `ssyrk` (LAPACK's lower triangle of the Fortran-ordered view)."""
    from scipy.linalg.blas import ssyrk

    upper = gram.numpy().T  # the Fortran-ordered view: its lower triangle is gram's upper
    with _blas_threads():
        for part in blocks:
            a = part.to(torch.float32).numpy()
            if a.flags.c_contiguous:  # B row-major is B^T column-major: C += (B^T)(B^T)^T
                out = ssyrk(1.0, a.T, beta=1.0, c=upper, trans=0, lower=1, overwrite_c=1)
            else:  # column-major B: C += B^T B
                out = ssyrk(1.0, a, beta=1.0, c=upper, trans=1, lower=1, overwrite_c=1)
            if out is not upper:  # f2py updates a Fortran-ordered float32 `c` in place
                upper[...] = out


def _mirror_upper(gram: torch.Tensor, block: int = 512) -> None:
    """Copy a square matrix's upper triangle onto its lower one, a band of rows at a time."""
    n = gram.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        diagonal = gram[a:b, a:b]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        gram[b:, a:b] = gram[a:b, b:].T


def times_lower(w: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """W @ L for a lower-triangular float32 L, in float32: on a CPU through BLAS `strmm`
    (half the flops of a product, into a float32 copy of W), elsewhere a plain product."""
    a, lower = w.detach().to(torch.float32, copy=True), lower.detach()
    if a.device.type != "cpu" or lower.device.type != "cpu":
        return a @ lower
    from scipy.linalg.blas import strmm

    # Fortran-ordered views: (W L)^T = L^T W^T, L^T on the left, read without a copy
    # whichever order L is stored in (a Cholesky factor from torch is column-major)
    column_major = not lower.is_contiguous() and lower.T.is_contiguous()
    l_t = {"a": lower.numpy(), "trans_a": 1, "lower": 1} if column_major else {
        "a": lower.contiguous().numpy().T, "trans_a": 0, "lower": 0}  # fmt: skip
    with _blas_threads():
        out = strmm(1.0, b=a.numpy().T, side=0, overwrite_b=1, **l_t)
    if torch.from_numpy(out.T).data_ptr() != a.data_ptr():  # not updated in place
        a.copy_(torch.from_numpy(out.T))
    return a


def _blas_threads():
    """SciPy's BLAS/LAPACK limited to torch's thread count (its own default is every core)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(torch.get_num_threads(), user_api="blas")


def _side_blocks(w: Weight, right: bool) -> Iterator[torch.Tensor]:
    """Blocks of rows of W (right) or of W^T, `BLOCK_ELEMENTS` entries or so each. A reader
    whose `row_blocks(rows)` / `column_blocks(columns)` gives them piece by piece is never
    read whole for them."""
    pieces = getattr(w, "row_blocks" if right else "column_blocks", None)
    rows = max(1, BLOCK_ELEMENTS // w.shape[1 if right else 0])
    blocks = pieces(rows) if pieces is not None else None
    if blocks is None:
        weight = _read(w).detach()
        blocks = (weight if right else weight.T).split(rows)
    yield from blocks


def symmetric_eigen(gram: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All eigenvalues (descending, on the CPU) of a symmetric matrix, and the eigenvectors of
    its `keep` largest, largest first (None for `keep=0`), on its device. On a CPU through
    `Tridiagonal` (`gram` is overwritten); on a GPU `torch.linalg.eigh`."""
    n = gram.shape[0]
    if gram.device.type == "cpu" and n >= 2:
        reduced = Tridiagonal.of(gram)
        return reduced.eigen(keep) if keep else (reduced.eigenvalues(), None)
    if not keep:
        return torch.linalg.eigvalsh(gram).flip(0).cpu(), None
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).cpu(), vectors[:, n - keep :].flip(1)


@dataclass
class Tridiagonal:
    """A symmetric matrix A reduced to tridiagonal form, Q^T A Q = T (LAPACK's `sytrd`, lower),
    on a CPU: T's diagonal `d` and off-diagonal `e`, and Q = H(1) ... H(n-1) as Householder
    reflectors: `tau` and each H(j+1)'s vector below its leading 1, stored from column j + 1
    of row j of `householder` ((n-1) x (n-1): transposed, the layout `ormqr` reads without a
    copy), or a function that gives that matrix when `eigen` needs it (a reduction kept on
    disk: `compressor.io.scratch`).

    The reduction is most of an eigendecomposition's cost. From it, all the eigenvalues cost
    little (`sterf`), and the top k eigenvectors (`eigen`) cost T's eigenvectors by divide and
    conquer (`stevd`, fast on a tridiagonal matrix) and carrying k of them back through the
    reflectors (`ormqr`). Measured on 2 cores, n = 4096: reduction 1.1-1.4 s, eigenvalues
    0.1 s, eigenvalues and 1,500 vectors 1.1 s more; a full `eigh` takes 4.2 s and LAPACK's
    subset driver `syevr` 3-5 s (its MRRR step is the slow one)."""

    d: torch.Tensor
    e: torch.Tensor
    tau: torch.Tensor
    householder: torch.Tensor | Callable[[], torch.Tensor]

    @classmethod
    def of(cls, gram: torch.Tensor) -> Tridiagonal:
        """Reduce a symmetric float32 CPU matrix (n >= 2) in place; only its upper triangle
        is read (LAPACK's lower one of the Fortran-ordered view)."""
        from scipy.linalg import lapack

        n = gram.shape[0]
        with _blas_threads():
            lwork = int(lapack.ssytrd_lwork(n, lower=1)[0])
            _, d, e, tau, info = lapack.ssytrd(gram.numpy().T, lower=1, lwork=lwork, overwrite_a=1)
        _check_lapack("sytrd", info)
        # row j's vector sits from column j + 2 of gram's row j; shift it into the
        # (n-1) x (n-1) layout in place (numpy copies overlapping slices correctly)
        flat = gram.view(-1).numpy()
        for j in range(n - 2):
            flat[j * (n - 1) + j + 1 : (j + 1) * (n - 1)] = flat[j * n + j + 2 : (j + 1) * n]
        householder = gram.view(-1)[: (n - 1) ** 2].view(n - 1, n - 1)
        return cls(torch.from_numpy(d), torch.from_numpy(e), torch.from_numpy(tau), householder)

    @property
    def n(self) -> int:
        return len(self.d)

    def eigenvalues(self) -> torch.Tensor:
        """All eigenvalues, descending."""
        from scipy.linalg import lapack

        values, info = lapack.ssterf(self.d.numpy(), self.e.numpy())
        _check_lapack("sterf", info)
        return torch.from_numpy(values[::-1].copy())

    def eigen(self, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All eigenvalues (descending) and the eigenvectors of the `keep` largest (n x keep,
        column-major, largest first). Memory: T's eigenvectors (n x n, and as much workspace),
        then the reflectors (n x n) beside the `keep` vectors, never both."""
        import numpy as np
        from scipy.linalg import lapack

        n = self.n
        with _blas_threads():
            values, z, info = lapack.sstevd(self.d.numpy(), self.e.numpy(), compute_v=1)
            _check_lapack("stevd", info)
            top = torch.from_numpy(np.asfortranarray(z[:, n - keep :][:, ::-1]))
            del z
            # Q acts on rows 2..n as a QR factorization's Q would (LAPACK's ormtr)
            top[1:] = torch.ormqr(self.reflectors().T, self.tau, top[1:])
        return torch.from_numpy(values[::-1].copy()), top

    def reflectors(self) -> torch.Tensor:
        """`householder` as a matrix (read, if it is a function that reads it)."""
        if isinstance(self.householder, torch.Tensor):
            return self.householder
        return self.householder()


def _check_lapack(routine: str, info: int) -> None:
    if info != 0:
        raise torch.linalg.LinAlgError(f"LAPACK {routine} failed (info={info})")


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
    w: Weight,
    rank: int,
    device: str | torch.device | None = None,
    basis: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (up, down) of `w` and their singular values, as `randomized_factors`
    returns them, from the top eigenvectors of the smaller side's float32 Gram matrix (on
    `device`; results on the CPU), or from `basis` (those vectors, at least `rank` of them, as
    `gram_decomposition` returns them) when given. On a CPU this costs a quarter to a half of
    a float32 SVD. Memory: the Gram matrix, and the factors in float32; `w` is converted a
    block of rows at a time, and when it is a function that reads it, it is read twice (for
    the Gram and for W V) and not held in between.

    The factors are W V V^T (or U U^T W) for an orthonormal V: an orthogonal projection of W,
    so ||W - up @ down||_F^2 = ||W||_F^2 - sum s^2 with s the column norms of W V. Vectors of
    nearly equal eigenvalues may mix (float32), which costs almost nothing in that error;
    callers that know the spectrum compare it with the optimum.
    """
    shape = tuple(w.shape)
    if not 1 <= rank <= min(shape):
        raise ValueError(f"`rank` must be in [1, {min(shape)}] for shape {shape}")
    dev = resolve_device(device)
    right = shape[0] >= shape[1]
    if basis is None:
        gram, _ = gram_matrix(w, dev, full=False)
        basis = symmetric_eigen(gram, rank)[1]
        del gram
    basis = basis[:, :rank].to(dev, torch.float32)
    # W V = U S (out x k, a block of rows at a time), or U^T W = S V^T (k x in, summed over
    # blocks of rows): either way the factor it becomes is contiguous, never copied
    out, inner = (max(shape), rank) if right else (rank, max(shape))
    scaled = torch.zeros(out, inner, device=dev, dtype=torch.float32)
    start = 0
    for part in _side_blocks(w, True):  # W's rows, contiguous on disk in the Linear layout
        rows = part.to(dev, torch.float32)
        if right:
            torch.mm(rows, basis, out=scaled[start : start + len(rows)])
        else:
            scaled.addmm_(basis[start : start + len(rows)].T, rows)
        start += len(rows)
    s = torch.linalg.vector_norm(scaled, dim=0 if right else 1)
    up, down = balanced_factors(scaled, basis, s, right)
    return up.cpu().contiguous(), down.cpu().contiguous(), s.cpu()
