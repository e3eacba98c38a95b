"""Swapping modules in a model: dense -> factorized, factorized -> dense or collapsed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from compressor.core.layers import (
    FactorizedLinear,
    QuantLinear,
    check_depth,
    dense_weight_of,
    layout_of,
)
from compressor.core.quantize import QuantSpec, gptq, quantize_chain, round_to_nearest

__all__ = [
    "collapse_",
    "count_params",
    "deepen_",
    "factorized_layers",
    "is_quantized",
    "merge_",
    "module_hooks",
    "quantize_",
    "quantized_layers",
    "replace_module",
    "swapped",
    "tied_keys",
]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module | None:
    """Put `new` at the dotted path `name`; returns the module that was there (or None)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    setattr(parent, child, new)
    return old


@contextmanager
def swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put `modules` (full name -> module) into `model` for the duration, then put back."""
    replaced = {n: replace_module(model, n, m) for n, m in modules.items()}
    try:
        yield
    finally:
        for n, m in replaced.items():
            replace_module(model, n, m)


def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Every `FactorizedLinear` in the model, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every quantized layer left dense (a `QuantLinear` that is not a factor), by full name."""
    factors = {f"{n}.{part}" for n in factorized_layers(model) for part in ("down", "up")}
    return {
        n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in factors
    }


def is_quantized(model: nn.Module) -> bool:
    """Whether any weight of `model` is stored as integer codes (a `QuantLinear`)."""
    return any(isinstance(m, QuantLinear) for m in model.modules())


@torch.no_grad()
def quantize_(
    model: nn.Module,
    names: Iterable[str],
    spec: QuantSpec,
    grams: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """In place: the weights of each named layer stored quantized (`spec`). A factorized
    layer keeps its chain, collapsed to two factors (its rank made even for 4-bit codes, two a
    byte, by a zero component), each factor a `QuantLinear`; a dense layer becomes one. With
    its input Gram in `grams`, GPTQ (a chain's up factor on its rounded down factor's outputs);
    without, round to nearest (compressor/core/quantize.py)."""
    for name in names:
        layer = model.get_submodule(name)
        gram = (grams or {}).get(name)
        if isinstance(layer, FactorizedLinear):
            layer = layer.collapse()
            up, down = layer.up.weight, layer.down.weight
            if spec.bits == 4 and layer.rank % 2:
                up = torch.cat([up, up.new_zeros(up.shape[0], 1)], 1)
                down = torch.cat([down, down.new_zeros(1, down.shape[1])], 0)
                layer.rank += 1
            up_q, down_q = quantize_chain(up, down, gram, spec)
            layer.down = QuantLinear.from_quantized(down_q, spec)
            layer.up = QuantLinear.from_quantized(up_q, spec, layer.up.bias)
        elif not isinstance(layer, QuantLinear):
            w = dense_weight_of(layer)
            q = gptq(w, gram, spec) if gram is not None else round_to_nearest(w, spec)
            layout = layout_of(layer)
            layer = QuantLinear.from_quantized(q, spec, layer.bias)
            layer.layout = layout
        replace_module(model, name, layer)
    return model


def _swap_all(model: nn.Module, fn: Callable[[FactorizedLinear], nn.Module]) -> nn.Module:
    for name, layer in factorized_layers(model).items():
        replace_module(model, name, fn(layer))
    return model


def collapse_(model: nn.Module) -> nn.Module:
    """In place: every factorized chain becomes its two-factor (depth 2) equivalent."""
    return _swap_all(model, FactorizedLinear.collapse)


def merge_(model: nn.Module) -> nn.Module:
    """In place: every factorized chain, and every quantized layer, becomes a dense layer of
    its original kind (quantized weights dequantized)."""
    for name, layer in quantized_layers(model).items():
        replace_module(model, name, layer.to_dense())
    return _swap_all(model, FactorizedLinear.to_dense)


def deepen_(model: nn.Module, depth: int) -> nn.Module:
    """In place: every factorized chain of depth < `depth` gains identity inner factors
    (up . I ... I . down), so it computes the same map with `depth` factors (docs/method.md 3)."""
    check_depth(depth)
    return _swap_all(model, lambda layer: _deepen(layer, depth))


def _deepen(layer: FactorizedLinear, depth: int) -> FactorizedLinear:
    if layer.depth >= depth:
        return layer
    p = layer.up.weight
    new = FactorizedLinear(
        layer.in_features, layer.out_features, layer.rank, depth, layer.up.bias is not None,
        dtype=p.dtype, device=p.device,
    )  # fmt: skip
    new.layout = layer.layout
    new.load_factors(layer.up.weight.detach(), layer.down.weight.detach())
    with torch.no_grad():
        for old, mid in zip(layer.mid, new.mid, strict=False):
            mid.weight.copy_(old.weight)
        if layer.up.bias is not None:
            new.up.bias.copy_(layer.up.bias)
    return new.train(layer.training)


def tied_keys(model: nn.Module) -> list[str]:
    """State-dict keys that are tied to another tensor (e.g. an LM head tied to the input
    embedding): not stored in an export, re-tied when loading."""
    keys = getattr(model, "_tied_weights_keys", None) or ()
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def count_params(model: nn.Module) -> int:
    """Parameters of a model, a tied tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def module_hooks(
    modules: Mapping[str, nn.Module], hook_for: Callable[[str], Callable], pre: bool = False
) -> Iterator[None]:
    """Meanwhile each of `modules` (name -> module) runs `hook_for(name)` as a forward hook
    (`pre`: a forward pre-hook); then the hooks are removed."""
    handles = [
        (m.register_forward_pre_hook if pre else m.register_forward_hook)(hook_for(n))
        for n, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
