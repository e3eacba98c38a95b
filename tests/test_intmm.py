"""Quantized layers run by torch's CPU integer kernels at a few rows (compressor/core/intmm.py):
the codes in each kernel's layout give the dequantized weight's outputs to bfloat16's precision,
more rows and gradients take the dequantized path exactly, new codes are packed again, and the
export-only loader's copy gives the same outputs bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.core import intmm
from compressor.core.layers import QuantLinear
from compressor.core.quantize import QuantSpec, QuantWeight, round_to_nearest
from compressor.io import modeling_dlnc

needs_kernels = pytest.mark.skipif(
    not intmm.kernels_available(), reason="this CPU has no native bfloat16 (kernels unused)"
)

LAYOUTS = [  # spec, (out, in): int8 a scale a row (inputs padded to 16); int4 in the kernel's
    # groups; int4 one group narrower than the kernel's (padded); outputs not a multiple of 16
    pytest.param(QuantSpec(8, 0), (10, 40), id="int8-row-padded"),
    pytest.param(QuantSpec(8, 0), (48, 64), id="int8-row"),
    pytest.param(QuantSpec(4, 64), (32, 128), id="int4-g64"),
    pytest.param(QuantSpec(4, 32), (17, 96), id="int4-g32-odd-out"),
    pytest.param(QuantSpec(4, 64), (10, 40), id="int4-one-group-padded"),
    pytest.param(QuantSpec(4, 64), (24, 120), id="int4-g60-padded-per-group"),
    pytest.param(QuantSpec(4, 64), (200, 128), id="int4-packed-in-blocks"),
]


def layer_of(spec: QuantSpec, shape: tuple[int, int], seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w, bias = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
    w[:, :3] += 2.0  # rows whose codes sit off centre: the zero points matter
    return QuantLinear.from_quantized(round_to_nearest(w, spec), spec, bias)


def no_dequantize(monkeypatch) -> None:
    def refuse(self, dtype=torch.float32):
        raise AssertionError("dequantized instead of running the integer kernel")

    monkeypatch.setattr(QuantWeight, "dequantize", refuse)


@needs_kernels
@pytest.mark.parametrize("spec, shape", LAYOUTS)
def test_few_rows_run_the_kernel_to_bfloat16_precision(spec, shape, monkeypatch):
    layer = layer_of(spec, shape)
    w = layer.weight.double()
    x = torch.randn(2, 8, shape[1], generator=torch.Generator().manual_seed(1))
    exact = nn.functional.linear(x.double(), w, layer.bias.double())
    no_dequantize(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 8, shape[0])
    # inputs, scales and the kernel's output each rounded to bfloat16 (8 bits of mantissa)
    bound = 2**-6 * (x.abs().double() @ w.abs().T) + 1e-6
    assert ((y.double() - exact).abs() <= bound).all()
    assert (y.double() - exact).abs().max() > 0  # (bfloat16's rounding: not the float path)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec, shape", LAYOUTS[:3])
def test_a_transposed_input_in_either_dtype_runs_the_kernel(spec, shape, dtype, monkeypatch):
    layer = layer_of(spec, shape)
    x, w = torch.randn(shape[1], 6).to(dtype).T, layer.weight.double()  # rows not contiguous
    exact = nn.functional.linear(x.double(), w, layer.bias.double())
    no_dequantize(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype
    bound = 2**-5 * (x.abs().double() @ w.abs().T) + 0.05  # (bfloat16 outputs: coarser)
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("spec, shape", LAYOUTS)
def test_more_rows_or_a_gradient_take_the_dequantized_weight(spec, shape):
    layer = layer_of(spec, shape)
    x = torch.randn(intmm.ROWS + 1, shape[1], requires_grad=False)
    expected = nn.functional.linear(x, layer.quantized().dequantize(), layer.bias)
    assert torch.equal(layer(x), expected)
    few = torch.randn(3, shape[1], requires_grad=True)
    out = layer(few)
    assert torch.equal(out, nn.functional.linear(few, layer.weight, layer.bias))
    out.sum().backward()
    assert torch.allclose(few.grad, layer.weight.sum(0).expand(3, -1))


def test_a_layout_no_kernel_takes_dequantizes():
    assert intmm.pack_for_cpu(round_to_nearest(torch.randn(8, 64), QuantSpec(8, 16))) is None
    assert intmm.pack_for_cpu(round_to_nearest(torch.randn(8, 600), QuantSpec(4, 300))) is None
    layer = layer_of(QuantSpec(4, 300), (8, 600))
    x = torch.randn(2, 600)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.quantized().dequantize(), layer.bias)
        assert torch.equal(layer(x), expected)


@needs_kernels
def test_codes_loaded_into_the_buffers_are_packed_again():
    spec = QuantSpec(8, 0)
    layer, other = layer_of(spec, (16, 32), seed=0), layer_of(spec, (16, 32), seed=1)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before, theirs = layer(x), other(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), theirs) and not torch.equal(before, theirs)


@needs_kernels
@pytest.mark.parametrize("spec, shape", LAYOUTS)
def test_the_export_only_loader_runs_the_same_kernels(spec, shape):
    mine = layer_of(spec, shape)
    portable = modeling_dlnc.QuantLinear(
        shape[1], shape[0], {"bits": spec.bits, "group": spec.group}, bias=True
    )
    portable.load_state_dict(mine.state_dict())
    x = torch.randn(5, shape[1])
    with torch.no_grad():
        expected = mine(x)
        assert torch.equal(portable(x), expected)
        assert not torch.equal(expected, nn.functional.linear(x, mine.weight, mine.bias))
