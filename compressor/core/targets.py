"""Which modules to compress: dense layers chosen by name, `re:` regex, and exclusions."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from functools import cache

from torch import nn

__all__ = [
    "DEFAULT_EXCLUDE",
    "DENSE_TYPES",
    "find_targets",
    "is_dense",
    "matches",
    "weight_readers",
]

DENSE_TYPES = ("Linear", "Conv1D")
"""Class names of the layers dlnc can factorize (`nn.Linear`, transformers' `Conv1D`)."""

DEFAULT_EXCLUDE = (
    r"re:(^|\.)(lm_head|embed_out|output_projection|classifier|score|qa_outputs|cls|pooler"
    r"|head|heads|fc_out|logits)(\.|$)",
)
"""Heads are left alone by default: the LM head, classifier heads and poolers."""


def is_dense(module: nn.Module) -> bool:
    """True for `nn.Linear` (and subclasses) and transformers' `Conv1D`."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(name: str, pattern: str) -> bool:
    """`re:REGEX` searches the module's full name; a plain pattern matches the name or a suffix
    of it at a dot boundary (`q_proj` matches `model.layers.0.self_attn.q_proj`)."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _any(name: str, patterns: Iterable[str]) -> bool:
    return any(matches(name, p) for p in patterns)


def find_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    exclude_defaults: bool = True,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> dict[str, nn.Module]:
    """The dense layers to compress, by full module name, in model order.

    `include=None` takes every dense layer; `exclude` drops names; the model's output
    embedding (the LM head, possibly tied to the input embedding) and `DEFAULT_EXCLUDE`
    are dropped too unless `exclude_defaults=False`; `filter_fn(module, fqn)` (torchao's
    filter, e.g. `compressor.options.TargetOptions.filter_fn`) chooses among the rest.
    """
    exclude = list(exclude or ())
    if exclude_defaults:
        exclude += DEFAULT_EXCLUDE
    head = _output_embedding(model)
    found = {}
    for name, module in model.named_modules():
        if not name or not is_dense(module) or module.weight.ndim != 2:
            continue
        if include is not None and not _any(name, include):
            continue
        if _any(name, exclude) or (exclude_defaults and module is head):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        found[name] = module
    return found


def _output_embedding(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter is not None else None
    except (AttributeError, NotImplementedError):
        return None


def weight_readers(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The layers whose parent reads `self.<layer>.weight` in its forward pass (T5's `wo`
    checks its dtype): a factorized layer has no single weight, so they must stay dense."""
    found = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if f"self.{child}.weight" in _forward_source(type(parent)):
            found.append(name)
    return found


@cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""
