import pytest
import torch
from torch import nn

from compressor.core.allocate import greedy_ranks, output_gains, relative_gains, uniform_ranks
from compressor.core.ranks import RankPolicy, allocate_ranks, factor_params
from compressor.core.whitening import Whitener
from compressor.methods import build_plan
from compressor.methods.calibration import collect_grams
from compressor.methods.output_aware import (
    channel_weights,
    output_whitened_factor_fn,
    output_whitened_spectrum,
)
from compressor.methods.sensitivity import output_sensitivity


def random_layers(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"l{i}": (int(o), int(n)) for i, (o, n) in
              enumerate(torch.randint(4, 40, (6, 2), generator=g).tolist())}  # fmt: skip
    spectra = {
        n: torch.rand(min(s), generator=g).sort(descending=True).values * 10 ** (3 * torch.rand(1))
        for n, s in shapes.items()
    }
    return spectra, shapes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.7, 0.95])
def test_no_allocation_overspends_keep(seed, keep):
    spectra, shapes = random_layers(seed)
    total = sum(o * i for o, i in shapes.values())
    for gains in (output_gains(spectra), relative_gains(spectra), None):
        ranks = allocate_ranks(spectra, shapes, RankPolicy(keep=keep), gains)
        kept = sum(factor_params(shapes[n], r.rank) for n, r in ranks.items())
        assert kept <= keep * total or all(r.rank == 1 for r in ranks.values())
    uniform = uniform_ranks(shapes, keep)
    assert sum(factor_params(shapes[n], r) for n, r in uniform.items()) <= max(
        keep * total, sum(sum(s) for s in shapes.values())
    )


def test_greedy_takes_the_largest_gains_per_parameter():
    shapes = {"a": (8, 8), "b": (8, 8)}
    gains = {"a": torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2]), "b": torch.tensor([9.0, 1, 1, 1, 1])}
    # budget 0.5 * 128 = 64 parameters = 4 directions of 16: 1 each, then a's next two
    assert greedy_ranks(gains, shapes, 0.5) == {"a": 3, "b": 1}


def test_scaling_a_layer_moves_rank_to_it_only_with_output_gains():
    spectra = {"a": torch.linspace(2, 1, 16), "b": torch.linspace(2, 1, 16)}
    shapes = {"a": (16, 16), "b": (16, 16)}
    even = greedy_ranks(output_gains(spectra), shapes, 0.4)
    assert even["a"] == even["b"]
    scaled = greedy_ranks(output_gains(spectra, {"a": torch.full((16,), 100.0)}), shapes, 0.4)
    assert scaled["a"] > scaled["b"]
    rel = greedy_ranks(relative_gains({"a": 10 * spectra["a"], "b": spectra["b"]}), shapes, 0.4)
    assert rel["a"] == rel["b"]  # the relative rule cannot see the scale


class TwoBranches(nn.Module):
    """y = S_a A x + S_b B x: A and B are equal; A's output is scaled 10x, B's 0.1x."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.b.load_state_dict(self.a.state_dict())
        self.scale_a, self.scale_b = nn.Linear(width, width), nn.Linear(width, width)
        with torch.no_grad():
            for m, c in ((self.scale_a, 10.0), (self.scale_b, 0.1)):
                m.weight.copy_(c * torch.eye(width))
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_a(self.a(x)) + self.scale_b(self.b(x))


def test_output_sensitivity_is_the_squared_downstream_gain():
    model = TwoBranches()
    batches = [{"x": torch.randn(256, 16)} for _ in range(4)]
    sens = output_sensitivity(model, {"a": model.a, "b": model.b}, batches, probes=2)
    torch.testing.assert_close(sens["a"].mean(), torch.tensor(100.0, dtype=torch.float64),
                               rtol=0.1, atol=0)  # fmt: skip
    torch.testing.assert_close(sens["b"].mean(), torch.tensor(0.01, dtype=torch.float64),
                               rtol=0.1, atol=0)  # fmt: skip
    assert all(p.requires_grad for p in model.parameters()) and model.a.weight.grad is None


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_the_layer_that_matters_more_gets_more_rank(method):
    model = TwoBranches()
    targets = {"a": model.a, "b": model.b}
    batches = [{"x": torch.randn(128, 16) @ torch.diag(torch.linspace(3, 0.1, 16))}]
    stats = collect_grams(model, targets, batches)
    sens = output_sensitivity(model, targets, batches)
    plan = build_plan(method, targets, stats, sensitivity=sens)
    ranks = allocate_ranks(plan.spectra, plan.shapes, RankPolicy(keep=0.4), plan.gains)
    assert ranks["a"].rank > ranks["b"].rank
    blind = allocate_ranks(plan.spectra, plan.shapes, RankPolicy(keep=0.4))
    assert blind["a"].rank == blind["b"].rank


def test_output_whitened_factors_reach_their_optimum():
    torch.manual_seed(0)
    w, x = torch.randn(12, 10, dtype=torch.float64), torch.randn(50, 10, dtype=torch.float64)
    whitener = Whitener.from_gram(x.T @ x, damping=0.0)
    d = channel_weights(torch.rand(12, dtype=torch.float64) * 5)
    factor = output_whitened_factor_fn({"w": w}, {"w": whitener}, {"w": d})
    s = output_whitened_spectrum(w, whitener, d)
    for rank in (1, 4, 9):
        up, down, rel = factor("w", None, rank)
        error = float((d[:, None] * (w - up @ down) @ whitener.root).norm())
        assert error == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-9)
        assert rel == pytest.approx(error / float(s.square().sum().sqrt()), rel=1e-9)
