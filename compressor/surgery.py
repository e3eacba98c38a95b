"""Swapping modules in a model: dense -> factorized, factorized -> dense or collapsed."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from compressor.layers import FactorizedLinear

__all__ = ["collapse_", "factorized_layers", "merge_", "replace_module"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted path `name`; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Every `FactorizedLinear` in the model, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _swap_all(model: nn.Module, fn: Callable[[FactorizedLinear], nn.Module]) -> nn.Module:
    for name, layer in factorized_layers(model).items():
        replace_module(model, name, fn(layer))
    return model


def collapse_(model: nn.Module) -> nn.Module:
    """In place: every factorized chain becomes its two-factor (depth 2) equivalent."""
    return _swap_all(model, FactorizedLinear.collapse)


def merge_(model: nn.Module) -> nn.Module:
    """In place: every factorized chain becomes a dense layer of its original kind."""
    return _swap_all(model, FactorizedLinear.to_dense)
