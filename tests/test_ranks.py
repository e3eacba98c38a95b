import pytest
import torch

from compressor.core.ranks import RankPolicy, allocate_ranks, factor_params
from compressor.errors import DlncError


def spectra_and_shapes():
    spectra = {
        "steep": torch.tensor([10.0, 1.0, 0.1, 0.01] + [0.001] * 12),
        "flat": torch.ones(16),
    }
    return spectra, {"steep": (16, 16), "flat": (16, 16)}


def test_budget_follows_the_spectra_not_a_uniform_split():
    spectra, shapes = spectra_and_shapes()
    ranks = allocate_ranks(spectra, shapes, RankPolicy(keep=0.25))
    assert ranks["steep"].rank < ranks["flat"].rank
    kept = sum(factor_params(shapes[n], r.rank) for n, r in ranks.items())
    assert kept <= 0.25 * 2 * 16 * 16


def test_budget_is_spent_when_it_can_be():
    torch.manual_seed(0)
    names = [f"l{i}" for i in range(4)]
    spectra = {n: torch.linalg.svdvals(torch.randn(64, 32)) for n in names}
    shapes = {n: (64, 32) for n in names}
    ranks = allocate_ranks(spectra, shapes, RankPolicy(keep=0.4))
    kept = sum(factor_params(shapes[n], r.rank) for n, r in ranks.items())
    total = 4 * 64 * 32
    assert 0.4 * total - 4 * 96 < kept <= 0.4 * total


def test_energy_policy_per_layer():
    spectra, shapes = spectra_and_shapes()
    ranks = allocate_ranks(spectra, shapes, RankPolicy(energy=0.98))  # 100 of 101.01
    assert ranks["steep"].rank == 1
    assert ranks["flat"].dense  # 16 directions >= break-even 8


def test_rank_at_breakeven_stays_dense_with_a_reason():
    spectra, shapes = spectra_and_shapes()
    ranks = allocate_ranks(spectra, shapes, RankPolicy(rank=8))
    assert ranks["flat"].dense and "break-even" in ranks["flat"].reason
    forced = allocate_ranks(spectra, shapes, RankPolicy(rank=8, dense_at_breakeven=False))
    assert forced["flat"].rank == 8


def test_rounding_to_a_multiple():
    spectra, shapes = spectra_and_shapes()
    shapes = {n: (64, 64) for n in shapes}
    spectra = {n: torch.cat([s, torch.zeros(48)]) for n, s in spectra.items()}
    ranks = allocate_ranks(spectra, shapes, RankPolicy(rank=5, multiple=4))
    assert {r.rank for r in ranks.values()} == {4}


def test_overrides_win():
    spectra, shapes = spectra_and_shapes()
    ranks = allocate_ranks(spectra, shapes, RankPolicy(rank=2, overrides={"flat": 3}))
    assert ranks["flat"].rank == 3 and ranks["steep"].rank == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"keep": 1.5}, "keep"),
        ({"keep": 0.0}, "keep"),
        ({"energy": 0.0}, "energy"),
        ({}, "exactly one"),
        ({"rank": 2, "keep": 0.5}, "exactly one"),
        ({"rank": 2, "multiple": 0}, "multiple"),
    ],
)
def test_bad_policies_name_the_field(kwargs, field):
    with pytest.raises(DlncError, match=field):
        RankPolicy(**kwargs)


def test_rank_above_a_layer_size_names_the_layer():
    spectra, shapes = spectra_and_shapes()
    with pytest.raises(DlncError, match="steep"):
        allocate_ranks(spectra, shapes, RankPolicy(rank=17))


def test_rounding_under_a_budget_never_overspends_it():
    torch.manual_seed(0)
    names = [f"l{i}" for i in range(6)]
    spectra = {n: torch.linalg.svdvals(torch.randn(160, 96)) for n in names}
    shapes = {n: (160, 96) for n in names}
    ranks = allocate_ranks(spectra, shapes, RankPolicy(keep=0.3, multiple=8))
    assert all(r.rank % 8 == 0 for r in ranks.values())
    kept = sum(factor_params(shapes[n], r.rank) for n, r in ranks.items())
    assert kept <= 0.3 * 6 * 160 * 96  # nearest-multiple rounding would give 24 > 18
