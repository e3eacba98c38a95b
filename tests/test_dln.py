"""compressor.dln: the deep linear network research core, on small problems (seconds each)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from compressor.dln.experiment import DLNBenchConfig, build_networks, run_dln_benchmark
from compressor.dln.mlp import MLPConfig, run_mlp
from compressor.dln.networks import compressed_network, end_to_end, prefix_products, wide_network
from compressor.dln.problems import ProblemConfig, make_problem
from compressor.dln.train import TrainConfig, chain_gradients, gd_step, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(task: str, d: int = 12, r: int = 2, **kw):
    return make_problem(ProblemConfig(task=task, d=d, r=r, measurements=400, **kw))


@pytest.mark.parametrize("task", ["factorization", "completion", "sensing"])
@pytest.mark.parametrize("width", [12, 4])
def test_closed_form_gradients_match_autograd(task, width):
    problem = _problem(task)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(width, 12, generator=gen, dtype=torch.float64)]
    weights += [torch.randn(width, width, generator=gen, dtype=torch.float64)]
    weights += [torch.randn(12, width, generator=gen, dtype=torch.float64)]
    leaves = [w.clone().requires_grad_() for w in weights]
    loss, _ = problem.loss_and_grad(end_to_end(leaves))
    expected = torch.autograd.grad(loss, leaves)
    prefixes = prefix_products(weights)
    _, grad = problem.loss_and_grad(prefixes[-1])
    for got, want in zip(chain_gradients(weights, prefixes, grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_target_has_rank_r_and_spread_spectrum():
    problem = _problem("factorization", d=40, r=4)
    s = torch.linalg.svdvals(problem.target)
    assert int((s > 1e-10 * s[0]).sum()) == 4
    assert s[3] < 0.9 * s[0]  # evenly spaced indices, not the top 4 clustered together


def test_compressed_init_is_spectral_and_small():
    problem = _problem("completion", d=20, r=3, observed=0.5)
    net = compressed_network(problem.surrogate(), 6, depth=4, eps=1e-2, alpha=5.0)
    assert [tuple(w.shape) for w in net.weights] == [(6, 20), (6, 6), (6, 6), (20, 6)]
    assert net.num_parameters() == 2 * 20 * 6 + 2 * 6 * 6
    assert net.lr_scales == [5.0, 1.0, 1.0, 5.0]
    u, _, vh = torch.linalg.svd(problem.surrogate())
    torch.testing.assert_close(net.end_to_end(), 1e-8 * u[:, :6] @ vh[:6])


def test_wide_layers_move_in_a_2r_dimensional_subspace():
    d, r = 16, 2
    problem = _problem("factorization", d=d, r=r)
    net = wide_network(d, depth=3, eps=1e-2, generator=torch.Generator().manual_seed(1))
    start = [w.clone() for w in net.weights]
    history = train(net, problem, TrainConfig(eta=6.0, max_iters=2000, tol=0.0))
    assert history.recovery_error[-1] < 1e-3  # it learned the target
    for w, w0 in zip(net.weights, start, strict=True):
        s = torch.linalg.svdvals(w - w0)
        assert s[r - 1] > 1e-2 * s[0]  # the change has rank r at least...
        assert s[2 * r] < 1e-6 * s[0]  # ...and at most 2r: the rest stays eps * I


def _small_completion(max_iters: int, tol: float = 0.0) -> DLNBenchConfig:
    problem = ProblemConfig(task="completion", d=24, r=2, observed=0.5, seed=0)
    return DLNBenchConfig(
        problem, TrainConfig(eta=6.0, max_iters=max_iters, tol=tol, log_every=100), alpha=4.0
    )


def test_compressed_beats_wide_at_equal_iterations():
    result = run_dln_benchmark(_small_completion(max_iters=1000))
    wide, compressed = result.wide, result.compressed
    assert wide.iterations == compressed.iterations
    assert compressed.train_loss[-1] < 1e-3 * wide.train_loss[-1]
    ahead_from = result.compressed_ahead_from()  # its recovery error stays at or below the wide's
    assert ahead_from is not None and ahead_from <= 500
    assert result.compressed_parameters < result.wide_parameters


def test_both_recover_the_target_and_stop_at_the_target_loss():
    result = run_dln_benchmark(_small_completion(max_iters=5000, tol=1e-10))
    summary = result.to_dict()
    for name in ("wide", "compressed"):
        history = getattr(result, name)
        assert history.reached_target
        assert history.iterations[-1] < 5000
        assert summary[name]["final_train_loss"] < 1e-10
        assert summary[name]["final_recovery_error"] < 1e-3  # unobserved entries too
    assert summary["speedup_iterations"] == pytest.approx(
        result.wide.target_iteration / result.compressed.target_iteration
    )
    assert summary["speedup_iterations"] > 1


def test_gd_step_decreases_the_loss_of_both_networks():
    config = _small_completion(max_iters=1)
    problem = make_problem(config.problem)
    for net in build_networks(config, problem):
        with torch.no_grad():
            losses = [float(gd_step(net, problem, 6.0)) for _ in range(300)]
        assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ProblemConfig(d=100, r=60), "`r` must be <= d/2 = 50"),
        (lambda: ProblemConfig(r=0), "`r`"),
        (lambda: ProblemConfig(observed=0.0), "`observed`"),
        (lambda: ProblemConfig(observed=1.5), "`observed`"),
        (lambda: ProblemConfig(task="denoising"), "`task`"),
        (lambda: ProblemConfig(measurements=0), "`measurements`"),
        (lambda: DLNBenchConfig(depth=1), "`depth`"),
        (lambda: DLNBenchConfig(alpha=0.0), "`alpha`"),
        (lambda: wide_network(8, 1, 1e-2, torch.Generator()), "`depth`"),
        (lambda: TrainConfig(eta=-1.0), "`eta`"),
        (lambda: TrainConfig(max_iters=0), "`max_iters`"),
        (lambda: MLPConfig(width=16, r=9), "`r`"),
        (lambda: MLPConfig(depth=1), "`depth`"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace("/", ".")):
        make()


def test_observed_fraction_one_is_allowed():
    problem = make_problem(ProblemConfig(task="completion", d=10, r=2, observed=1.0))
    assert problem.n_observed == 100


def test_mlp_both_chains_learn_digits():
    result = run_mlp(MLPConfig(width=64, r=4, epochs=60, lr=0.05))
    for run in (result.wide, result.compressed):
        assert run.test_accuracy > 0.8  # chance is 0.1
    assert result.compressed.chain_parameters < result.wide.chain_parameters


def test_import_stays_light():
    code = (
        "import sys, compressor.dln, compressor.dln.plots; "
        "bad = [m for m in ('rich', 'matplotlib', 'accelerate') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
