"""Quantized weights, the maths and the layers: codes stored and read back, rounding within
half a step, GPTQ against rounding to nearest, a chain's factors in turn, and `quantize_` on
dense and factorized layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.core.intmm import ROWS
from compressor.core.layers import FactorizedLinear, QuantLinear
from compressor.core.quantize import (
    QuantSpec,
    gptq,
    keep_for_bits,
    pack,
    quantize_chain,
    round_to_nearest,
    spec_of,
    unpack,
)
from compressor.core.surgery import quantize_, quantized_layers
from compressor.errors import DlncError
from compressor.workflows.quantize import quantize_model, stored_bits


def correlated_inputs(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated (a real layer's are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) * torch.logspace(0, -2, width)[:, None]
    return torch.randn(rows, width, generator=g) @ mix


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_are_stored_and_read_back_exactly(bits):
    codes = torch.randint(0, 2**bits, (5, 32), dtype=torch.uint8)
    stored = pack(codes, bits)
    assert stored.shape == (5, 32 * bits // 8) and stored.dtype == torch.uint8
    assert torch.equal(unpack(stored, bits, 32), codes)


def test_a_weight_on_the_grid_is_rounded_to_itself():
    """w = (q - zero) * scale with a power-of-two scale, each group reaching 0 and the top
    code: min-max finds that scale and zero again, and every code."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (6, 4, 16), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    zero = torch.randint(0, 16, (6, 4, 1), generator=g).float()
    scale = 2.0 ** torch.randint(-8, -2, (6, 4, 1), generator=g).float()
    w = ((q - zero) * scale).view(6, 64)
    assert torch.equal(round_to_nearest(w, QuantSpec(4, 16)).dequantize(), w)


@pytest.mark.parametrize("bits, group", [(4, 16), (4, 0), (8, 0), (3, 8)])
def test_rounding_to_nearest_is_within_half_a_step(bits, group):
    w = torch.randn(7, 48) * torch.logspace(-2, 1, 48)
    q = round_to_nearest(w, QuantSpec(bits, group))
    size = QuantSpec(bits, group).group_of(48)
    step = q.scales.float().repeat_interleave(size, 1)
    # half a step, and float16's rounding of the scale (2^-11 of it) times the top code
    assert ((w - q.dequantize()).abs() <= step * (0.5 + (2**bits) * 2**-11)).all()


def test_group_sizes_divide_the_inputs():
    spec = QuantSpec(4, 64)
    assert [spec.group_of(n) for n in (576, 100, 120, 56, 127)] == [64, 50, 60, 56, 127]
    assert QuantSpec(8, 0).group_of(576) == 576
    assert spec.bits_per_weight(576) == 4 + 24 / 64
    assert spec.stored_shapes(3, 576) == {
        "qweight": [3, 288], "scales": [3, 9], "zeros": [3, 9],
    }  # fmt: skip


def test_gptq_on_uncorrelated_inputs_is_rounding_to_nearest():
    """A diagonal Gram spreads no error to other columns: the codes are round-to-nearest's."""
    w = torch.randn(9, 64)
    spec = QuantSpec(4, 16)
    by_gptq, nearest = gptq(w, torch.eye(64) * 3.0, spec), round_to_nearest(w, spec)
    assert torch.equal(by_gptq.qweight, nearest.qweight)
    assert torch.equal(by_gptq.scales, nearest.scales)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    x = correlated_inputs(512, 64)
    w = torch.randn(16, 64)
    spec = QuantSpec(3, 16)

    def output_error(q):
        return float(((w - q.dequantize()) @ x.T).norm())

    assert output_error(gptq(w, x.T @ x, spec)) < 0.8 * output_error(round_to_nearest(w, spec))


def test_a_chains_up_factor_is_rounded_for_the_rounded_down_factors_outputs():
    """GPTQ of up on the Gram of down_q's outputs: the chain's output error is lower than with
    up rounded to nearest after the same down."""
    x = correlated_inputs(400, 32)
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(24, 16, generator=g), torch.randn(16, 32, generator=g)
    spec = QuantSpec(3, 8)
    q_up, q_down = quantize_chain(up, down, x.T @ x, spec)
    assert torch.equal(q_down.qweight, gptq(down, x.T @ x, spec).qweight)
    dq = q_down.dequantize()
    target = up @ down @ x.T

    def error(u):
        return float((u @ dq @ x.T - target).norm())

    assert error(q_up.dequantize()) < error(round_to_nearest(up, spec).dequantize())


def test_a_chain_without_data_is_rounded_to_nearest():
    up, down = torch.randn(8, 4), torch.randn(4, 16)
    spec = QuantSpec(4, 8)
    q_up, q_down = quantize_chain(up, down, None, spec)
    assert torch.equal(q_up.qweight, round_to_nearest(up, spec).qweight)
    assert torch.equal(q_down.qweight, round_to_nearest(down, spec).qweight)


def test_a_quantized_layer_runs_its_dequantized_weight():
    w, bias = torch.randn(10, 32), torch.randn(10)
    layer = QuantLinear.from_quantized(
        round_to_nearest(w, QuantSpec(4, 16)), QuantSpec(4, 16), bias
    )
    x = torch.randn(3, ROWS, 32)  # more rows than the integer kernels take (test_intmm.py)
    expected = nn.functional.linear(x, layer.quantized().dequantize(), bias)
    assert torch.equal(layer(x), expected)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # the codes are buffers


def test_quantize_on_dense_and_factorized_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))
    model[2] = FactorizedLinear.from_dense(model[2], rank=7)  # odd: made even for 4 bits
    x = torch.randn(64, 32)
    before = model(x).detach()
    hidden = torch.relu(model[0](x)).detach()
    grams = {"0": x.T @ x, "2": hidden.T @ hidden}
    quantize_(model, ["0", "2"], QuantSpec(4, 16), grams)
    assert isinstance(model[0], QuantLinear) and set(quantized_layers(model)) == {"0"}
    chain = model[2]
    assert isinstance(chain.down, QuantLinear) and chain.rank == 8 and chain.down.out_features == 8
    manual = nn.functional.linear(
        nn.functional.linear(torch.relu(model[0](x)), chain.down.weight), chain.up.weight,
        chain.up.bias,
    )  # fmt: skip
    assert torch.equal(model(x), manual)
    rel = float((model(x) - before).detach().norm() / before.norm())
    assert 0 < rel < 0.1
    assert stored_bits(model[0]) == 48 * 32 * 4 + 48 * 2 * 24


def test_int8_keeps_a_full_rank_chain_close_and_counts_its_bits():
    torch.manual_seed(0)
    dense = nn.Linear(16, 16)
    model = nn.Sequential(FactorizedLinear.from_dense(dense, rank=16))
    x = torch.randn(40, 16)
    report = quantize_model(model, ["0"], QuantSpec(8, 0))
    assert report["rounding"] == "nearest" and report["layers"] == 1
    assert report["bits_per_weight"] == pytest.approx(2 * (8 + 24 / 16))
    out = model(x).detach()
    ref = dense(x).detach()
    assert float((out - ref).norm() / ref.norm()) < 0.01


def test_quantize_options_are_checked():
    assert spec_of(None, None) is None
    assert spec_of("int8", None) == QuantSpec(8, 0) and spec_of("int4", None) == QuantSpec(4, 64)
    with pytest.raises(DlncError, match="`quantize` must be one of int8, int4"):
        spec_of("int3", None)
    with pytest.raises(DlncError, match="`group_size` must be >= 0"):
        spec_of("int4", -1)


def test_the_keep_for_a_bits_budget_spends_exactly_the_budget():
    spec = QuantSpec(4, 64)
    targeted, others = [(576, 576), (1536, 576), (576, 1536)], [(192, 576), (192, 576)]
    keep = keep_for_bits(3.5, spec, targeted, others)
    per = 4 + 24 / 64
    t, rest = sum(o * i for o, i in targeted), sum(o * i for o, i in others)
    assert per * (keep * t + rest) == pytest.approx(3.5 * (t + rest))
    with pytest.raises(DlncError, match=r"int4 alone stores about 4\.38 bits"):
        keep_for_bits(4.5, spec, targeted, others)
    with pytest.raises(DlncError, match="too small"):
        keep_for_bits(0.2, spec, targeted, others)
