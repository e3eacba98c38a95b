"""What a checkpoint is, read without loading its weights: its `model_type`, and for a family
no recipe claims, its module tree (built on the meta device from config.json) to choose a
recipe by structure.

The structure rule: a recipe fits a model when its target names and the model's dense
layers match both ways: each of its `include` patterns names a layer compression would take
(heads and the LM head are never taken), each `exclude` pattern names some module (what
compression itself checks), and together they take every dense layer the generic recipe
would. So a decoder with q/k/v/o_proj and gate/up/down_proj gets `llama`, but one whose MLP
is `c_fc`/`c_proj` fits no recipe (the attention-only `moe` recipe would leave its MLP
dense) and gets generic with a warning. A recipe without `include` (generic) never fits;
where two fit, the first by name wins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from torch import nn

from compressor.core.targets import find_targets, matches, weight_readers

__all__ = ["best_fit", "checkpoint_model_type", "fits", "skeleton"]

T = TypeVar("T")


def checkpoint_model_type(path: str | Path, config: str | Path | None = None) -> str | None:
    """`model_type` from the checkpoint's config.json without loading the model (None if none)."""
    config_file = _config_file(path, config)
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # load_checkpoint reports a missing or broken config properly
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def _config_file(path: str | Path, config: str | Path | None) -> Path:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return Path(config) if config else folder / "config.json"


def skeleton(
    path: str | Path, config: str | Path | None = None, trust_remote_code: bool = False
) -> nn.Module | None:
    """The checkpoint's model with its parameters on the meta device (no weights read), or
    None when transformers cannot build it from config.json (loading reports why)."""
    from compressor.io.checkpoint import model_class, read_config
    from compressor.io.streaming import meta_model

    config_file = _config_file(path, config)
    if not config_file.is_file():
        return None
    try:
        hf_config = read_config(config_file, trust_remote_code)
        cls = model_class(hf_config, trust_remote_code)
        if cls is None or not hasattr(cls, "config_class"):  # none named, or remote code
            from transformers import AutoModel

            def cls(c):
                return AutoModel.from_config(c, trust_remote_code=trust_remote_code)

        return meta_model(cls, hf_config)
    except Exception:  # an unknown architecture, or its own code failing on this config
        return None


def fits(model: nn.Module, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    """True when a recipe with these patterns matches `model`'s dense layers both ways: each
    include pattern names a layer it would take, each exclude pattern names a module, and
    together they take every layer the generic recipe would (heads, embeddings and layers whose
    parent reads their `.weight` aside). No include list (generic itself) is never a fit."""
    if include is None:
        return False
    every = find_targets(model)
    every = set(every) - set(weight_readers(model, every))
    taken = set(find_targets(model, include, exclude))
    names = [n for n, _ in model.named_modules() if n]
    return (
        bool(every)
        and every <= taken
        and all(any(matches(n, p) for n in taken) for p in include)
        and all(any(matches(n, p) for n in names) for p in exclude)
    )


def best_fit(
    model: nn.Module, candidates: Iterable[tuple[T, Sequence[str] | None, Sequence[str]]]
) -> T | None:
    """The first of the `(recipe, include, exclude)` candidates that `fits` the model, or
    None when none does."""
    return next((r for r, include, exclude in candidates if fits(model, include, exclude)), None)
