"""Tensor mode: a bare state dict presented as a module tree, for checkpoints of no known
architecture. Each `<prefix>.weight` 2-D float tensor (with an optional matching `<prefix>.bias`)
becomes an `nn.Linear`, so targeting, surgery and export work as for any model; the tree has
no forward pass of its own.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from compressor.errors import DlncError

__all__ = ["TENSOR_MODE_EXCLUDE", "TensorModel", "container"]

TENSOR_MODE_EXCLUDE = (r"re:(embed|wte|wpe|tok_emb|pos_emb|position|token_type)",)
"""In tensor mode embedding tables look like dense weights: leave them alone by name."""


class TensorModel(nn.Module):
    """A module tree that holds a state dict's tensors under their original names."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, tensor in state_dict.items():
            if not all(key.split(".")):
                raise DlncError(
                    f"tensor name {key!r} is not a dotted module path (like `layer.weight`), "
                    "so tensor mode cannot place it"
                )
            prefix, _, leaf = key.rpartition(".")
            groups[prefix][leaf] = tensor
        for prefix in sorted(groups, key=lambda p: p.count(".")):
            _attach(self, prefix, groups[prefix], has_children=_has_children(prefix, groups))

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a tensor-mode model holds weights only; it has no forward pass")


def _has_children(prefix: str, groups: dict[str, dict[str, torch.Tensor]]) -> bool:
    return any(p.startswith(prefix + ".") for p in groups if p != prefix)


def _is_linear(tensors: dict[str, torch.Tensor]) -> bool:
    w, b = tensors.get("weight"), tensors.get("bias")
    if w is None or w.ndim != 2 or not w.is_floating_point() or set(tensors) - {"weight", "bias"}:
        return False
    return b is None or (b.ndim == 1 and b.shape[0] == w.shape[0])


def container(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted `path`, creating empty modules along the way."""
    module = root
    for part in path.split(".") if path else ():
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def _attach(root: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], has_children: bool):
    if prefix and not has_children and _is_linear(tensors):
        w, b = tensors["weight"], tensors.get("bias")
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            linear.bias = nn.Parameter(b, requires_grad=False)
        parent, _, leaf = prefix.rpartition(".")
        container(root, parent).add_module(leaf, linear)
        return
    module = container(root, prefix)
    for leaf, tensor in tensors.items():
        module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
