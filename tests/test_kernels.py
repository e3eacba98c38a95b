"""The speed-aware plan (issue 27): kernel curves, never-slower caps, their allocation, the
cache, and compress under `speed`. Timings are replaced by an exact cost model, so every
number asserted here follows from the model, not from this machine's load."""

import itertools
import json
import math

import pytest
import torch
from cli_helpers import dlnc, one_line_error
from tiny_models import save_tiny
from torch import nn

from compressor.core.allocate import greedy_ranks, relative_gains
from compressor.core.kernels import KernelCurve, expected_speedup, measure_curve, speed_cap
from compressor.core.layers import FactorizedLinear
from compressor.core.ranks import RankPolicy, allocate_ranks, factor_params
from compressor.errors import DlncError
from compressor.options import CompressOptions, LoadOptions
from compressor.workflows import speedplan
from compressor.workflows.compress import compress_checkpoint

CALL = 3000.0  # the fixed cost of one matmul kernel, in units of one multiply-add per row


def model_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """An exact cost model: each matmul costs CALL plus its multiply-adds per row."""
    rows = x.shape[0]
    if isinstance(layer, FactorizedLinear):
        return 2 * CALL + rows * layer.rank * (layer.in_features + layer.out_features)
    return CALL + rows * layer.in_features * layer.out_features


def counting_timer():
    """The cost model, and the list of its calls (one entry a timing)."""
    calls = []

    def counting(layer, x):
        calls.append(1)
        return model_seconds(layer, x)

    return calls, counting


def exact_cap(shape: tuple[int, int], rows: int, multiple: int = 1) -> int:
    """The largest multiple of `multiple` with model_seconds(factorized) <= model_seconds(dense)."""
    out_f, in_f = shape
    best = math.floor((rows * out_f * in_f - CALL) / (rows * (out_f + in_f)))
    return max(0, min(best, min(shape))) // multiple * multiple


@pytest.mark.parametrize("shape", [(48, 32), (32, 96), (40, 40)])
@pytest.mark.parametrize("rows", [1, 8])
def test_the_cap_is_where_the_factorized_layer_stops_being_faster(shape, rows):
    curve = measure_curve(shape, rows, timer=model_seconds)
    assert curve.dense == model_seconds(nn.Linear(shape[1], shape[0]), torch.zeros(rows, 1))
    for multiple in (1, 8):
        assert curve.cap(multiple) == exact_cap(shape, rows, multiple)
    # the curve is linear in the rank, so it is exact between (and beyond) the timed ranks
    for rank in range(1, min(shape) + 1):
        layer = FactorizedLinear(shape[1], shape[0], rank)
        assert curve.at(rank) == pytest.approx(model_seconds(layer, torch.zeros(rows, 1)))


def test_a_busy_stretch_slows_both_sides_of_a_ratio_and_moves_no_cap():
    """The load changes between the (rank, dense) pairs, never inside one: every time the
    curve holds is the quiet one, so the cap is exact; the old rule (the quickest dense time
    against each rank's own) put the cap below the truth."""
    calls = []

    def busy(layer, x):
        calls.append(1)
        load = 3.0 if (len(calls) - 1) // 2 % 3 == 1 else 1.0  # every third pair runs slow
        return load * model_seconds(layer, x)

    for shape, rows in (((48, 32), 1), ((40, 40), 8)):
        curve = measure_curve(shape, rows, timer=busy)
        assert curve.cap() == exact_cap(shape, rows)
        quiet = measure_curve(shape, rows, timer=model_seconds)
        assert curve.dense == quiet.dense
        assert curve.times == pytest.approx(quiet.times, rel=1e-12)


def test_the_cap_holds_at_every_row_count_and_a_curve_round_trips():
    curves = [measure_curve((64, 64), rows, timer=model_seconds) for rows in (1, 8, 256)]
    assert speed_cap(curves, 4) == min(exact_cap((64, 64), r, 4) for r in (1, 8, 256))
    assert exact_cap((64, 64), 1) < exact_cap((64, 64), 256)  # decode is where it is tight
    again = KernelCurve.from_dict((64, 64), 8, json.loads(json.dumps(curves[1].to_dict())))
    assert again == curves[1]


def test_expected_speedup_is_the_ratio_of_the_layers_times():
    curves = {((64, 32), 8): measure_curve((64, 32), 8, timer=model_seconds)}
    layers = {"a": ((64, 32), 4), "b": ((64, 32), None)}
    dense = CALL + 8 * 64 * 32
    chosen = 2 * CALL + 8 * 4 * 96 + dense
    assert expected_speedup(layers, curves, 8) == pytest.approx(2 * dense / chosen)


SHAPES = {"a": (40, 24), "b": (32, 32), "c": (48, 16)}


def _spectra(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(min(s), generator=g).sort(descending=True).values for n, s in SHAPES.items()
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_capped_ranks_stay_under_their_caps_and_the_budget(seed, keep):
    spectra = _spectra(seed)
    caps = {"a": 6, "b": 0, "c": 3}
    ranks = greedy_ranks(relative_gains(spectra), SHAPES, keep, caps, dense_offer=True)
    spent = 0
    for name, rank in ranks.items():
        dense = rank > caps[name]
        assert rank <= caps[name] or rank == min(SHAPES[name])  # factorized and faster, or dense
        spent += factor_params(SHAPES[name], None if dense else rank)
    assert ranks["b"] == min(SHAPES["b"])  # cap 0: dense outright
    total = sum(o * i for o, i in SHAPES.values())
    floor = 32 * 32 + (40 + 24) + (48 + 16)  # b dense, a and c at rank 1: the least there is
    assert spent <= max(keep * total, floor)


def _gain(spectra, name, rank):
    g = relative_gains(spectra)[name]
    return float(g.sum() if rank is None else g[:rank].sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_capped_allocation_matches_the_best_split_by_brute_force(seed):
    """Under caps each layer is a rank in [1, cap] or dense; the greedy split over the upper
    hull reaches the best total gain of every split that fits, except where a whole jump to
    dense is left over (then it is within that jump's gain)."""
    spectra = _spectra(seed)
    caps = {"a": 5, "b": 4, "c": 3}
    keep = 0.55
    total = sum(o * i for o, i in SHAPES.values())
    ranks = greedy_ranks(relative_gains(spectra), SHAPES, keep, caps, dense_offer=True)
    options = {n: [*range(1, caps[n] + 1), None] for n in SHAPES}
    best = 0.0
    for choice in itertools.product(*options.values()):
        pick = dict(zip(SHAPES, choice, strict=True))
        if sum(factor_params(SHAPES[n], r) for n, r in pick.items()) <= keep * total:
            best = max(best, sum(_gain(spectra, n, r) for n, r in pick.items()))
    got = {n: None if r > caps[n] else r for n, r in ranks.items()}
    assert sum(factor_params(SHAPES[n], r) for n, r in got.items()) <= keep * total
    reached = sum(_gain(spectra, n, r) for n, r in got.items())
    biggest_jump = max(_gain(spectra, n, None) - _gain(spectra, n, 1) for n in SHAPES)
    assert best - biggest_jump <= reached <= best + 1e-12


def test_caps_at_or_above_break_even_change_nothing():
    spectra = _spectra(0)
    plain = greedy_ranks(relative_gains(spectra), SHAPES, 0.5)
    assert greedy_ranks(relative_gains(spectra), SHAPES, 0.5, {n: 99 for n in SHAPES}) == plain


def test_never_slower_keeps_a_layer_dense_above_its_cap():
    spectra = {"a": torch.linspace(2, 1, 24)}
    policy = RankPolicy(rank=10, speed="never-slower", caps={(40, 24): 8})
    decision = allocate_ranks(spectra, {"a": (40, 24)}, policy)["a"]
    assert decision.dense and "ranks <= 8" in decision.reason
    assert (
        allocate_ranks(
            spectra, {"a": (40, 24)}, RankPolicy(rank=8, speed="never-slower", caps={(40, 24): 8})
        )["a"].rank
        == 8
    )
    assert allocate_ranks(spectra, {"a": (40, 24)}, RankPolicy(rank=10))["a"].rank == 10


def test_speed_is_checked_and_a_missing_cap_is_an_error():
    with pytest.raises(DlncError, match="`speed` must be one of smallest, never-slower"):
        RankPolicy(keep=0.5, speed="fastest")
    with pytest.raises(DlncError, match="no measured cap"):
        allocate_ranks(
            {"a": torch.ones(4)}, {"a": (4, 4)}, RankPolicy(rank=2, speed="never-slower")
        )


def test_curves_are_measured_once_per_device_and_then_read_back(tmp_path):
    calls, counting = counting_timer()

    cpu = torch.device("cpu")
    first = speedplan.kernel_curves([(32, 16)], cpu, cache_dir=tmp_path, timer=counting)
    assert calls and len(first) == 3  # one curve per row count
    n = len(calls)
    again = speedplan.kernel_curves([(32, 16)], cpu, cache_dir=tmp_path, timer=counting)
    assert len(calls) == n and again == first  # read back, not measured
    speedplan.kernel_curves([(32, 16)], cpu, torch.float64, cache_dir=tmp_path, timer=counting)
    assert len(calls) == 2 * n  # another dtype is another key
    (tmp_path / speedplan.CACHE_FILE).write_text("{not json")
    speedplan.kernel_curves([(32, 16)], cpu, cache_dir=tmp_path, timer=counting)
    assert len(calls) == 3 * n  # a broken cache is measured again
    assert json.loads((tmp_path / speedplan.CACHE_FILE).read_text())  # and rewritten


def test_a_set_openmp_wait_policy_is_another_device(tmp_path, monkeypatch):
    calls, counting = counting_timer()

    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    speedplan.kernel_curves([(32, 16)], cpu, cache_dir=tmp_path, timer=counting)
    n = len(calls)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY=PASSIVE" in speedplan.device_key(cpu, torch.float32)
    speedplan.kernel_curves([(32, 16)], cpu, cache_dir=tmp_path, timer=counting)
    assert len(calls) == 2 * n  # measured again, not read from the default policy's curves


@pytest.fixture
def cost_model(monkeypatch):
    monkeypatch.setattr(speedplan, "best_seconds", model_seconds)


def test_compress_never_slower_ships_no_slower_layer(tmp_path, cost_model):
    _, folder = save_tiny("llama", tmp_path / "m", hidden_size=64, intermediate_size=128)
    runs = {}
    for speed in ("smallest", "never-slower"):
        options = CompressOptions(policy=RankPolicy(keep=0.8, speed=speed),
                                  load=LoadOptions())  # fmt: skip
        runs[speed] = compress_checkpoint(folder, tmp_path / speed, options)
    fast = runs["never-slower"].report
    assert fast["policy"]["speed"] == "never-slower"
    for layer in fast["layers"]:
        if layer["rank"] is not None:
            shape = tuple(layer["shape"])
            assert layer["rank"] <= min(exact_cap(shape, rows) for rows in (1, 8, 256))
    assert fast["expected_speed"]["slower_layers"] == 0
    assert min(fast["expected_speed"]["speedup"].values()) >= 1.0
    assert fast["targeted_params_after"] <= 0.8 * fast["targeted_params_before"] + 1
    plain = runs["smallest"]
    slower = plain.report["expected_speed"]["slower_layers"]
    assert any("expected slower than dense" in n for n in plain.notices) == (slower > 0)
    cap = {tuple(lay["shape"]): min(exact_cap(tuple(lay["shape"]), r) for r in (1, 8, 256))
           for lay in plain.report["layers"]}  # fmt: skip
    over = [lay for lay in plain.report["layers"] if (lay["rank"] or 0) > cap[tuple(lay["shape"])]]
    assert slower == len(over)  # the plain plan's layers above their cap are the slower ones


def test_the_command_line_takes_speed_and_refuses_a_bad_one_before_work(tmp_path, cost_model):
    _, folder = save_tiny("llama", tmp_path / "m", hidden_size=64, intermediate_size=128)
    bad = dlnc("compress", folder, "--keep", "0.8", "--speed", "fast", "--out", tmp_path / "x")
    one_line_error(bad, "--speed", "smallest, never-slower")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ok"
    done = dlnc("compress", folder, "--keep", "0.8", "--speed", "never-slower", "--out", out)
    assert done.exit_code == 0, done.output
    assert "layer time, 1 row (expected)" in done.output
    report = json.loads((out / "report.json").read_text())
    assert report["policy"]["speed"] == "never-slower"
    assert report["expected_speed"]["slower_layers"] == 0


def test_the_real_timer_gives_a_time_per_call():
    from compressor.core.kernels import best_seconds

    x = torch.randn(8, 64)
    seconds = best_seconds(nn.Linear(64, 64), x, repeats=2, floor=1e-4)
    assert 0 < seconds < 1  # seconds per call of a 64x64 matmul, not per run


def test_going_dense_is_an_offer_of_its_own_when_it_buys_more():
    """A flat layer's directions past break-even are worth nothing one at a time but all of
    them together when it goes dense: with the dense offer the budget buys that, and more
    gain in all than direction by direction."""
    shapes = {"flat": (20, 12), "decaying": (40, 40)}
    # per parameter: a flat direction 1/32, a decaying one about 4/80, the flat jump 11/208
    gains = {"flat": torch.ones(12), "decaying": 4.0 * 0.99 ** torch.arange(40.0)}
    keep = (240 + 80 + 160) / (20 * 12 + 40 * 40)  # dense flat, rank 1 decaying, 2 more

    def total(ranks):
        return sum(
            float(gains[n][: ranks[n]].sum() if ranks[n] <= 7 or n != "flat" else gains[n].sum())
            for n in shapes
        )

    plain = greedy_ranks(gains, shapes, keep)
    offered = greedy_ranks(gains, shapes, keep, dense_offer=True)
    assert plain["flat"] < 8  # direction by direction it never pays to finish the flat layer
    assert offered["flat"] == 12  # dense
    assert total(offered) > total(plain)
    spent = sum(factor_params(shapes[n], None if n == "flat" else r) for n, r in offered.items())
    assert spent <= keep * (20 * 12 + 40 * 40)
