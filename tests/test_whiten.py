"""Whitened truncation: the exact optimum on calibration inputs, never worse than plain SVD,
and no crash on singular Gram matrices."""

from __future__ import annotations

import pytest
import torch

from compressor.core.linalg import spectral_factors
from compressor.core.whitening import Whitener, whitened_factors, whitened_spectrum


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, d, dtype=torch.float64
    )
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing


def output_error(w, w_approx, x) -> float:
    return float(((w - w_approx) @ x.T).norm())


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_error_equals_theoretical_optimum(rank):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 16, generator=g, dtype=torch.float64)
    x = correlated_inputs(200, 16)
    gram = x.T @ x
    up, down, err, rel = whitened_factors(w, Whitener.from_gram(gram, damping=0.0), rank)
    measured = output_error(w, up @ down, x)
    # the optimum, computed independently: a Cholesky root of the (non-singular) Gram
    chol = torch.linalg.cholesky(gram)
    s = torch.linalg.svdvals(w @ chol)
    optimum = float(s[rank:].square().sum().sqrt())
    assert measured == pytest.approx(optimum, rel=1e-8)
    assert err == pytest.approx(optimum, rel=1e-8)
    assert rel == pytest.approx(optimum / float(s.norm()), rel=1e-8)
    # never above plain SVD on the same inputs
    svd_up, svd_down = spectral_factors(w, rank)
    assert measured <= output_error(w, svd_up @ svd_down, x) + 1e-9


def test_beats_svd_by_a_margin_on_correlated_inputs():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = correlated_inputs(500, 32, seed=3)
    up, down, *_ = whitened_factors(w, Whitener.from_gram(x.T @ x), 8)
    svd_up, svd_down = spectral_factors(w, 8)
    assert output_error(w, up @ down, x) < 0.7 * output_error(w, svd_up @ svd_down, x)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("case", ["dead_feature", "few_samples", "zero"])
def test_singular_gram_compresses_without_error(case, damping):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(12, 24, generator=g, dtype=torch.float64)
    x = torch.randn(100, 24, generator=g, dtype=torch.float64)
    if case == "dead_feature":
        x[:, 5] = 0.0
    elif case == "few_samples":
        x = x[:6]  # 6 samples, width 24: rank-6 Gram
    else:
        x = torch.zeros_like(x)
    whitener = Whitener.from_gram(x.T @ x, damping=damping)
    up, down, *_ = whitened_factors(w, whitener, 4)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    if case == "zero":
        assert whitener is None  # no signal: plain SVD
        return
    if damping == 0.0:
        # the exact optimum still holds on the data seen, via the pseudo-inverse
        s = torch.linalg.svdvals(w @ x.T)
        assert output_error(w, up @ down, x) == pytest.approx(
            float(s[4:].square().sum().sqrt()), rel=1e-6, abs=1e-9
        )
    else:  # damping keeps the factors bounded where there is no data
        assert float((up @ down).norm()) < 10 * float(w.norm())


def test_spectrum_is_that_of_w_times_root():
    w = torch.randn(8, 10, dtype=torch.float64)
    x = correlated_inputs(50, 10)
    whitener = Whitener.from_gram(x.T @ x, damping=0.0)
    root = whitener.root
    torch.testing.assert_close(root @ root.T, x.T @ x)
    torch.testing.assert_close(whitened_spectrum(w, whitener), torch.linalg.svdvals(w @ root))


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_the_float32_route_reaches_the_float64_optimum(shape):
    # A float32 Gram gives a float32 whitener (tridiagonal route on a CPU); the Gram route's
    # factors of W L then reach the float64 whitened optimum to float32 precision, and their
    # error follows from the returned singular values (an orthogonal projection of W L).
    from compressor.core.gram import gram_singular_values, gram_tridiagonal
    from compressor.core.whitening import whitened_gram_factors

    out_f, in_f = shape
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = correlated_inputs(600, in_f)
    gram = x.T @ x / 600
    exact = Whitener.from_gram(gram)
    single = Whitener.from_gram(gram.float())  # a float32 copy: overwritten
    assert single.root.dtype == torch.float32 and exact.root.dtype == torch.float64
    damped = exact.root @ exact.root.T
    rebuilt = (single.root @ single.root.T).double()
    assert float((rebuilt - damped).norm() / damped.norm()) < 1e-5
    # both the damped Gram's Cholesky factor (the same root in two precisions), and its inverse
    assert torch.equal(single.root, single.root.tril()) and torch.equal(
        exact.root, exact.root.tril()
    )
    torch.testing.assert_close(single.root.double(), exact.root, rtol=1e-4, atol=1e-4)
    identity = torch.eye(in_f)
    assert float((single.root_pinv @ single.root - identity).abs().max()) < 1e-4
    assert single.lower and exact.lower  # W L through the triangular product
    torch.testing.assert_close(single.whiten(w), w.float() @ single.root, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exact.whiten(w), w.float() @ exact.root.float())
    # the inverse is not held; X L^-1 is a triangular solve, equal to the product with it
    assert single.pinv is None and exact.pinv is None
    m = torch.randn(4, in_f, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    torch.testing.assert_close(exact.inverse_t(m), m @ exact.root_pinv.T)
    rows = torch.randn(3, in_f, generator=torch.Generator().manual_seed(5))
    for whitener in (single, exact):
        got = whitener.unwhiten(rows.to(whitener.root.dtype))
        want = rows.to(whitener.root.dtype) @ whitener.root_pinv
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((got @ whitener.root).float(), rows, rtol=1e-3, atol=1e-3)
    want = whitened_spectrum(w, exact)
    got = gram_singular_values(w.float() @ single.root).double()  # what pass 1 computes
    assert float((got.square() - want.square()).abs().max()) <= 1e-5 * float(want[0]) ** 2
    for rank in (10, 60):
        _, _, optimum, _ = whitened_factors(w, exact, rank)
        up, down, s = whitened_gram_factors(w, single, rank)
        error = float(((w - (up @ down).double()) @ exact.root).norm())
        assert error == pytest.approx(optimum, rel=1e-4)
        total = float(want.square().sum())
        assert (total - float(s.double().square().sum())) ** 0.5 == pytest.approx(error, rel=1e-3)
        # from a kept reduction's basis (streamed pass 2), W L never formed: the same optimum
        basis = gram_tridiagonal(w.float() @ single.root)[0].eigen(rank)[1]
        up, down, s = whitened_gram_factors(w, single, rank, basis)
        error = float(((w - (up @ down).double()) @ exact.root).norm())
        assert error == pytest.approx(optimum, rel=1e-4)
        assert (total - float(s.double().square().sum())) ** 0.5 == pytest.approx(error, rel=1e-3)


def test_a_singular_float32_gram_without_damping_takes_the_eigen_route():
    # no Cholesky factor: rank 20 of 50, undamped; the root is then Q Lambda^1/2 and its
    # pseudo-inverse drops the null space
    x = torch.randn(20, 50, generator=torch.Generator().manual_seed(4))
    gram = x.T @ x
    whitener = Whitener.from_gram(gram.clone(), damping=0.0)
    assert whitener.root.dtype == torch.float32
    assert not torch.equal(whitener.root, whitener.root.tril())
    rebuilt = whitener.root @ whitener.root.T
    assert float((rebuilt - gram).norm() / gram.norm()) < 1e-5
    projector = whitener.root @ whitener.root_pinv  # onto the row space of x
    assert float((projector @ x.T - x.T).norm() / x.norm()) < 1e-4
    assert int(torch.linalg.matrix_rank(projector.double(), atol=1e-3)) == 20


@pytest.mark.parametrize("shape", [(7, 40), (40, 7), (1, 1)])
def test_times_a_lower_triangular_matrix_is_the_product(shape):
    # BLAS trmm on Fortran-ordered views: W L, with W's float32 copy overwritten, not W
    from compressor.core.gram import times_lower

    g = torch.Generator().manual_seed(5)
    w = torch.randn(*shape, generator=g, dtype=torch.float64)
    lower = torch.randn(shape[1], shape[1], generator=g).tril()
    kept = w.clone()
    for stored in (lower, lower.T.contiguous().T):  # row-major, column-major (Cholesky's)
        got = times_lower(w, stored)
        assert got.dtype == torch.float32 and torch.equal(w, kept)
        torch.testing.assert_close(got, w.float() @ lower, rtol=1e-5, atol=1e-5)
