"""The factorized layers of an export rebuilt from its layer table (config.json's `dlnc`
section): an empty `FactorizedLinear` swapped in for each, for its stored factors to fill.
Shared by `load_pretrained` and the transformers quantizer (compressor/io/hf.py)."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import replace_module

__all__ = ["install_factorized"]


def install_factorized(
    model: nn.Module,
    layers: dict[str, dict],
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
    create_parents: bool = False,
) -> nn.Module:
    """Swap in an empty `FactorizedLinear` (on `device`, meta by default: no memory) for each
    entry of an export's layer table; loading the state dict with `assign=True` fills them.

    `dtype` None takes the dtype of the module being replaced. A layer of a head the model
    lacks (a base model loaded from a head model's export) is skipped, as transformers skips
    its weights; `create_parents` builds missing containers (tensor mode).
    """
    for name, spec in layers.items():
        local = name if create_parents else _local_name(model, name)
        if local is None:
            continue
        out_f, in_f = spec["shape"]
        if create_parents:
            from compressor.io.tensor_model import container

            container(model, local.rpartition(".")[0])
            kind = dtype
        else:
            kind = dtype or next(model.get_submodule(local).parameters()).dtype
        layer = FactorizedLinear(
            in_f, out_f, spec["rank"], 2, spec["bias"], dtype=kind, device=device
        )  # fmt: skip
        layer.layout = spec.get("layout", "linear")
        replace_module(model, local, layer)
    return model


def _local_name(model: nn.Module, name: str) -> str | None:
    """`name` as a path in `model`, across the base-model prefix (`transformer.`, `bert.`)."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name, f"{prefix}.{name}"] if prefix else [name]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1 :])
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    if prefix and not hasattr(model, prefix) and not name.startswith(prefix + "."):
        return None  # a head layer; this model is the base alone
    raise KeyError(f"no module at {name}")
