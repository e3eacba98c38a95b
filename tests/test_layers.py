import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from compressor.core.layers import FactorizedLinear
from compressor.core.linalg import singular_values, truncation_error


def linear(out_f=24, in_f=16, dtype=torch.float32, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("depth", [2, 3, 5])
def test_full_rank_chain_reproduces_the_layer(depth):
    dense = linear()
    layer = FactorizedLinear.from_dense(dense, rank=16, depth=depth)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    assert layer.depth == depth and len(layer.mid) == depth - 2


def test_conv1d_layout_is_transposed_and_restored():
    torch.manual_seed(0)
    conv = Conv1D(24, 16)  # nf=out, nx=in; weight is in x out
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = FactorizedLinear.from_dense(conv, rank=16)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    back = layer.to_dense()
    assert isinstance(back, Conv1D) and back.weight.shape == conv.weight.shape
    torch.testing.assert_close(back(x), conv(x), rtol=1e-4, atol=1e-4)


def test_truncated_layer_error_is_the_eckart_young_optimum():
    dense = linear(40, 30)
    layer = FactorizedLinear.from_dense(dense, rank=7)
    s = singular_values(dense.weight)
    error = torch.linalg.norm(layer.dense_weight() - dense.weight.detach())
    assert float(error) == pytest.approx(truncation_error(s, 7), rel=1e-4)


def test_collapse_and_to_dense_keep_the_map():
    layer = FactorizedLinear.from_dense(linear(), rank=5, depth=4)
    with torch.no_grad():
        for m in layer.mid:  # make the inner factors non-trivial
            m.weight.add_(0.1 * torch.randn_like(m.weight))
    x = torch.randn(6, 16)
    two = layer.collapse()
    assert two.depth == 2 and two.rank == 5
    torch.testing.assert_close(two(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense()(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_and_bias_are_kept(dtype):
    dense = linear(dtype=dtype)
    layer = FactorizedLinear.from_dense(dense, rank=8, depth=3)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    assert torch.equal(layer.up.bias, dense.bias)


def test_layer_without_bias():
    layer = FactorizedLinear.from_dense(linear(bias=False), rank=4)
    assert layer.up.bias is None
    assert layer.to_dense().bias is None


@pytest.mark.parametrize(("rank", "depth"), [(0, 2), (17, 2), (4, 1)])
def test_bad_rank_or_depth_is_refused(rank, depth):
    with pytest.raises(ValueError, match=r"rank|depth"):
        FactorizedLinear(16, 24, rank, depth)


def test_factorized_layer_has_fewer_parameters_below_breakeven():
    layer = FactorizedLinear(768, 768, 192)
    assert sum(p.numel() for p in layer.parameters()) == 192 * 1536 + 768
