"""Module surgery: replacing, collapsing, merging and deepening chains keep the model's map."""

from __future__ import annotations

import pytest
import torch

from compressor.core.compress import compress_
from compressor.core.layers import FactorizedLinear
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import (
    collapse_,
    count_params,
    deepen_,
    factorized_layers,
    merge_,
    replace_module,
    tied_keys,
)
from compressor.core.targets import find_targets
from compressor.errors import DlncError
from tests.conftest import MLP, build_tiny


def _compressed(rank: int = 4) -> MLP:
    torch.manual_seed(0)
    model = MLP().eval()
    compress_(model, find_targets(model), RankPolicy(rank=rank))
    return model


def test_replace_module_returns_what_was_there():
    model = MLP()
    old, new = model.fc1, torch.nn.Identity()
    assert replace_module(model, "fc1", new) is old and model.fc1 is new


def test_deepen_then_collapse_keeps_the_map_and_the_depth_changes():
    model = _compressed()
    x = torch.randn(5, 16)
    before = model(x)
    deepen_(model, 4)
    assert {layer.depth for layer in factorized_layers(model).values()} == {4}
    torch.testing.assert_close(model(x), before)
    for layer in factorized_layers(model).values():  # make the inner factors non-trivial
        with torch.no_grad():
            layer.mid[0].weight.mul_(1.5)
    moved = model(x)
    collapse_(model)
    assert {layer.depth for layer in factorized_layers(model).values()} == {2}
    torch.testing.assert_close(model(x), moved, rtol=1e-5, atol=1e-5)


def test_merge_gives_dense_layers_with_the_same_outputs():
    model = _compressed()
    x = torch.randn(5, 16)
    before = model(x)
    merge_(model)
    assert not factorized_layers(model)
    assert all(type(m) is torch.nn.Linear for m in (model.fc1, model.fc2))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_merge_of_a_gpt2_chain_gives_back_a_conv1d():
    model = build_tiny("gpt2")
    compress_(model, find_targets(model), RankPolicy(rank=4))
    merge_(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_deepen_rejects_a_depth_below_two():
    with pytest.raises(DlncError, match="`depth` must be >= 2"):
        deepen_(_compressed(), 1)


def test_count_params_counts_a_tied_tensor_once_and_tied_keys_names_it():
    model = build_tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    every_tensor = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    embedding = model.transformer.wte.weight.numel()
    assert count_params(model) == every_tensor - embedding  # the head's copy is not counted
    assert "lm_head.weight" in tied_keys(model)


def test_a_factorized_layer_counts_its_factors():
    layer = FactorizedLinear(16, 48, rank=4, depth=3)
    assert count_params(torch.nn.Sequential(layer)) == 4 * 16 + 4 * 4 + 48 * 4 + 48
