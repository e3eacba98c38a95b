import math

import pytest
import torch

from compressor.core import linalg
from compressor.core.gram import (
    RANDOMIZED_TOL,
    Tridiagonal,
    gram_decomposition,
    gram_factors,
    gram_matrix,
    gram_singular_values,
    randomized_factors,
    rows_gram,
    use_randomized,
)
from compressor.io.scratch import load_tridiagonal, save_tridiagonal


def low_rank(out_f: int, in_f: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16), (48, 12), (12, 48)])
@pytest.mark.parametrize("rank", [1, 4, 11])
def test_spectral_factors_reach_the_eckart_young_optimum(shape, rank):
    w = torch.randn(*shape, dtype=torch.float64)
    up, down = linalg.spectral_factors(w, rank)
    s = linalg.singular_values(w)
    error = torch.linalg.norm(w - up @ down)
    assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
    assert error == pytest.approx(linalg.truncation_error(s, rank), rel=1e-10)
    assert error == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-10)


def test_spectral_factors_are_balanced_and_exact_at_full_rank():
    w = torch.randn(10, 7, dtype=torch.float64)
    up, down = linalg.spectral_factors(w, 7)
    torch.testing.assert_close(up @ down, w)
    torch.testing.assert_close(up.T @ up, down @ down.T)  # both equal S_k


def test_half_precision_weights_are_factored_in_float32():
    w = low_rank(24, 16, 3).to(torch.bfloat16)  # bf16 rounding makes it full rank
    up, down = linalg.spectral_factors(w, 16)
    assert up.dtype == torch.float32
    torch.testing.assert_close(up @ down, w.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 13])
def test_spectral_factors_reject_ranks_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        linalg.spectral_factors(torch.randn(12, 20), rank)


def test_energy_rank_counts_the_smallest_prefix():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert linalg.energy_rank(s, 9 / 14) == 1
    assert linalg.energy_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert linalg.energy_rank(s, 1.0) == 3
    assert linalg.energy_rank(torch.zeros(3), 0.9) == 0


def test_rank_measures_on_known_spectra():
    flat = torch.ones(8)
    assert linalg.effective_rank(flat) == pytest.approx(8.0)
    assert linalg.stable_rank(flat) == pytest.approx(8.0)
    assert linalg.participation_ratio(flat) == pytest.approx(8.0)
    spike = torch.tensor([1.0, 0.0, 0.0])
    assert linalg.effective_rank(spike) == pytest.approx(1.0)
    assert linalg.stable_rank(spike) == pytest.approx(1.0)


def test_numerical_rank_of_an_exactly_low_rank_matrix():
    w = low_rank(30, 20, 5)
    assert linalg.numerical_rank(linalg.singular_values(w), (30, 20)) == 5


def test_breakeven_rank():
    assert linalg.breakeven_rank(768, 768) == 384
    assert linalg.breakeven_rank(3072, 768) == pytest.approx(614.4)
    k = linalg.floor_breakeven(3072, 768)
    assert k * (3072 + 768) < 3072 * 768 <= (k + 1) * (3072 + 768)
    assert math.isclose(linalg.breakeven_rank(10, 10), 5.0)


@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (30, 30)])
def test_gram_route_matches_a_full_svd(shape):
    w = torch.randn(*shape)
    torch.testing.assert_close(linalg.singular_values(w), torch.linalg.svdvals(w))
    d = linalg.decompose(w, keep=10)
    assert d.kept == 10
    up, down = linalg.factors_from(w, d, 7)
    best = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = best
    torch.testing.assert_close(up @ down, (u[:, :7] * s[:7]) @ vh[:7], atol=1e-4, rtol=1e-4)
    up12, down12 = linalg.factors_from(w, d, 12)  # beyond what was kept: recomputed
    torch.testing.assert_close(up12 @ down12, (u[:, :12] * s[:12]) @ vh[:12], atol=1e-4, rtol=1e-4)


def test_factors_of_a_rank_deficient_matrix_have_no_nans():
    w = low_rank(64, 16, 3)
    up, down = linalg.spectral_factors(w, 8)  # 5 zero singular values inside the rank
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    torch.testing.assert_close(up @ down, w, atol=1e-3, rtol=1e-4)


def flat(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A Gaussian matrix: a flat (Marchenko-Pastur) spectrum, the randomized SVD's worst case."""
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("shape", "rank"), [((768, 512), 48), ((512, 768), 56), ((640, 512), 48)])
def test_randomized_factors_reach_the_optimum_within_tolerance_on_a_flat_spectrum(shape, rank):
    # Wherever `use_randomized` picks the randomized path, even a flat spectrum must come
    # within RANDOMIZED_TOL (1%) of the Eckart-Young optimum in Frobenius norm.
    assert use_randomized(shape, rank)
    w = flat(*shape)
    up, down, s = randomized_factors(w, rank)
    exact = torch.linalg.svdvals(w.double())
    optimum = linalg.truncation_error(exact, rank)
    error = float(torch.linalg.norm(w.double() - (up @ down).double()))
    assert optimum <= error <= (1 + RANDOMIZED_TOL) * optimum
    # W' = up @ down is an orthogonal projection of W: its error follows from s alone
    from_s = (float(w.double().square().sum()) - float(s.double().square().sum())) ** 0.5
    assert from_s == pytest.approx(error, rel=1e-4)
    torch.testing.assert_close(up.T @ up, down @ down.T, rtol=1e-3, atol=1e-3)  # balanced


def test_randomized_factors_are_exact_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(600, 300, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    s = 0.9 ** torch.arange(300, dtype=torch.float64)
    w = (u * s) @ v.T
    up, down, top = randomized_factors(w, 40)
    optimum = linalg.truncation_error(s, 40)
    error = float(torch.linalg.norm(w - (up @ down).double()))
    assert error == pytest.approx(optimum, rel=1e-4)
    torch.testing.assert_close(top.double(), s[:40], rtol=1e-5, atol=0)


def test_use_randomized_only_well_below_the_size_of_large_layers():
    assert use_randomized((4096, 4096), 512)
    assert not use_randomized((4096, 4096), 1024)  # the Gram route costs less there
    assert use_randomized((11008, 4096), 256)
    assert not use_randomized((11008, 4096), 1024)  # a tall layer's sketch costs more
    assert not use_randomized((256, 4096), 8)  # small side: exact is cheap


@pytest.mark.parametrize(
    ("shape", "rank"), [((700, 300), 60), ((300, 700), 150), ((512, 512), 256)]
)
def test_gram_factors_reach_the_optimum_on_a_flat_spectrum(shape, rank):
    w = flat(*shape)
    up, down, s = gram_factors(w, rank)
    exact = torch.linalg.svdvals(w.double())
    optimum = linalg.truncation_error(exact, rank)
    error = float(torch.linalg.norm(w.double() - (up @ down).double()))
    assert error == pytest.approx(optimum, rel=1e-4)  # float32 rounding either side
    # an orthogonal projection of W: the error follows from the returned singular values
    from_s = (float(w.double().square().sum()) - float(s.double().square().sum())) ** 0.5
    assert from_s == pytest.approx(error, rel=1e-4)
    torch.testing.assert_close(s.double(), exact[:rank], rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(700, 300), (300, 700), (400, 400)])
def test_gram_singular_values_are_within_float32_gram_precision(shape):
    w = flat(*shape).to(torch.bfloat16)
    exact = torch.linalg.svdvals(w.double())
    fast = gram_singular_values(w).double()
    assert fast.shape == exact.shape
    assert float((fast.square() - exact.square()).abs().max()) <= 1e-5 * float(exact[0]) ** 2


@pytest.mark.parametrize("shape", [(700, 300), (300, 700), (400, 400)])
def test_gram_decomposition_gives_the_spectrum_and_the_top_singular_vectors(shape):
    # one eigendecomposition of the Gram matrix (LAPACK sytrd + stevd + ormqr on a CPU):
    # every singular value, and orthonormal top vectors from which the factors of any
    # smaller rank reach the Eckart-Young optimum
    w = flat(*shape)
    exact = torch.linalg.svdvals(w.double())
    d = gram_decomposition(w, 120)
    assert d.right == (shape[0] >= shape[1])
    assert d.basis.shape == (min(shape), 120)
    assert float((d.s.double().square() - exact.square()).abs().max()) <= 1e-5 * exact[0] ** 2
    torch.testing.assert_close(d.basis.T @ d.basis, torch.eye(120), atol=1e-5, rtol=0)
    for rank in (1, 60, 120):
        up, down, _ = gram_factors(w, rank, basis=d.basis)
        error = float(torch.linalg.norm(w.double() - (up @ down).double()))
        assert error == pytest.approx(linalg.truncation_error(exact, rank), rel=1e-4)
    assert gram_decomposition(w, 0).basis.shape == (min(shape), 0)


@pytest.mark.parametrize("shape", [(700, 300), (300, 700)])
def test_gram_matrix_is_the_smaller_sides_gram_in_both_triangles(shape):
    w = flat(*shape)
    gram, right = gram_matrix(w, "cpu")
    want = w.T @ w if right else w @ w.T
    assert right == (shape[0] > shape[1])
    torch.testing.assert_close(gram, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("n", [7, 256, 257, 600])
def test_rows_gram_is_the_full_product_in_both_triangles(n):
    # bands of 256 columns, the last one short, mirrored: X^T X to float32 rounding
    x = flat(300, n)
    gram = rows_gram(x)
    assert gram.dtype == x.dtype and gram.shape == (n, n)
    torch.testing.assert_close(gram.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-3)
    assert torch.equal(gram, gram.T)


def test_a_tridiagonal_reduction_gives_eigenpairs_and_survives_a_file(tmp_path):
    # sytrd once; all eigenvalues (sterf) or the top k eigenpairs (stevd + ormqr), also
    # after a round trip through the file pass 1 writes for pass 2
    w = flat(500, 200)
    gram = (w.T @ w).double()
    reduced = Tridiagonal.of((w.T @ w).contiguous())
    want = torch.linalg.eigvalsh(gram).flip(0)
    scale = float(want[0])
    assert float((reduced.eigenvalues().double() - want).abs().max()) <= 1e-5 * scale
    values, vectors = reduced.eigen(30)
    assert float((values.double() - want).abs().max()) <= 1e-5 * scale
    residual = gram @ vectors.double() - vectors.double() * want[:30]
    assert float(residual.norm()) <= 1e-5 * scale * 30**0.5
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(30), atol=1e-5, rtol=0)
    save_tridiagonal(reduced, tmp_path / "r.bin")
    again = load_tridiagonal(tmp_path / "r.bin", 200)
    assert not isinstance(again.householder, torch.Tensor)  # the reflectors stay on disk
    for got, same in zip(again.eigen(30), (values, vectors), strict=True):
        assert torch.equal(got, same)
