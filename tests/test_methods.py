"""The rank-method registry: lookup, the auto rule, input checks, plans, and a new method
added by registering one class (nothing else changes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import methods
from compressor.core.compress import compress_
from compressor.core.linalg import energy_rank
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets
from compressor.errors import DlncError
from compressor.methods.calibration import collect_grams
from compressor.methods.registry import unregister
from tests.conftest import MLP


def test_names_and_aliases():
    assert methods.names() == ("svd", "whiten", "dynamics")
    assert methods.get("spectrum").name == "svd"
    with pytest.raises(DlncError, match="must be one of svd, whiten, dynamics, got 'pca'"):
        methods.get("pca")


@pytest.mark.parametrize(
    ("available", "expected"),
    [(set(), "svd"), ({"grams"}, "whiten"), ({"updates"}, "dynamics"),
     ({"grams", "updates"}, "dynamics")],
)  # fmt: skip
def test_auto_picks_the_most_informed_method_the_inputs_allow(available, expected):
    assert methods.auto_method(frozenset(available)) == expected


@pytest.mark.parametrize(
    ("name", "message"), [("whiten", "give `data`"), ("dynamics", "`reference`")]
)
def test_a_method_without_its_inputs_names_what_is_missing(name, message):
    with pytest.raises(DlncError, match=message):
        methods.check_inputs(name, frozenset())


def test_svd_plan_factors_reach_the_eckart_young_error():
    torch.manual_seed(0)
    model = MLP()
    targets = find_targets(model)
    plan = methods.build_plan("svd", targets)
    for name, module in targets.items():
        w = module.weight.detach()
        up, down, rel = plan.factor_fn(name, module, 3)
        s = torch.linalg.svdvals(w.double())
        optimum = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rel == pytest.approx(optimum, rel=1e-6)
        assert float((w - up @ down).norm() / w.norm()) == pytest.approx(optimum, rel=1e-4)
        assert plan.reading(name, 0.9) == energy_rank(s, 0.9)


def test_whiten_plan_reads_the_whitened_spectrum():
    torch.manual_seed(0)
    model = MLP()
    targets = find_targets(model)
    batches = [{"x": torch.randn(16, 16)} for _ in range(2)]
    stats = collect_grams(model, targets, batches)
    plan = methods.build_plan("whiten", targets, stats)
    for name, layer in targets.items():
        # s(W L) with L L^T the mean Gram (over the input rows) damped by 1% of its mean
        # diagonal (docs/data-aware.md); every such root L gives the same singular values
        gram = stats[name].gram.double() / stats[name].rows
        damped = gram + 1e-2 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        whitened = layer.weight.detach().double() @ torch.linalg.cholesky(damped)
        expected = torch.linalg.svdvals(whitened)
        torch.testing.assert_close(plan.spectra[name].double(), expected, rtol=1e-6, atol=1e-9)
        assert not torch.allclose(plan.spectra[name], plan.weight_spectra[name].double())
        assert plan.reading(name, 0.9) == energy_rank(plan.spectra[name], 0.9)


class _RowNorms(methods.RankMethod):
    """A toy method: ranks from the sorted row norms of W, factors from the top rows."""

    name = "rownorm"
    column = "rownorm"
    priority = -1

    def spectra(self, weights, inputs, progress):
        return {n: w.norm(dim=1).sort(descending=True).values for n, w in weights.tensors.items()}

    def factor_fn(self, weights, inputs, spectra):
        def factor(name: str, module: nn.Module, rank: int):
            w = weights.tensors[name]
            top = w.norm(dim=1).argsort(descending=True)[:rank]
            up = torch.zeros(w.shape[0], rank)
            up[top, torch.arange(rank)] = 1.0
            return up, w[top].detach().clone(), 0.0

        return factor

    def reading(self, name, spectrum, weights, inputs, tau):
        return energy_rank(spectrum, tau)


def test_a_new_method_is_one_registered_class():
    methods.register(_RowNorms())
    try:
        assert "rownorm" in methods.names()
        torch.manual_seed(0)
        model = MLP()
        targets = find_targets(model)
        plan = methods.build_plan("rownorm", targets)
        report = compress_(model, targets, RankPolicy(rank=2), 2, plan.method,
                           plan.spectra, plan.factor_fn)  # fmt: skip
        assert report.method == "rownorm" and all(r.rank == 2 for r in report.layers)
        from compressor.recipes.schema import parse_recipe

        assert parse_recipe("ranks: {method: rownorm, keep: 0.5}").ranks.method == "rownorm"
        with pytest.raises(ValueError, match="already registered"):
            methods.register(_RowNorms())
    finally:
        unregister("rownorm")
    assert "rownorm" not in methods.names()
