"""The factorized layers of an export rebuilt from its layer table (config.json's `dlnc`
section): an empty `FactorizedLinear` swapped in for each (its factors `QuantLinear`s when the
entry has `bits`), and an empty `QuantLinear` for each quantized layer left dense, for the
stored tensors to fill. Shared by `load_pretrained` and the transformers quantizer
(compressor/io/hf.py)."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear, QuantLinear
from compressor.core.surgery import replace_module
from compressor.io.section import quant_spec

__all__ = ["install_factorized"]


def install_factorized(
    model: nn.Module,
    layers: dict[str, dict],
    *,
    quantized: dict[str, dict] | None = None,
    device: torch.device | str = "meta",
    dtype: torch.dtype | None = None,
    create_parents: bool = False,
) -> nn.Module:
    """Swap in an empty `FactorizedLinear` (on `device`, meta by default: no memory) for each
    entry of an export's layer table, and an empty `QuantLinear` for each of `quantized` (the
    section's quantized dense layers); loading the state dict with `assign=True` fills them.

    `dtype` None takes the dtype of the module being replaced. A layer of a head the model
    lacks (a base model loaded from a head model's export) is skipped, as transformers skips
    its weights; `create_parents` builds missing containers (tensor mode).
    """
    for table, build in ((layers, _factorized), (quantized or {}, _quantized)):
        for name, spec in table.items():
            local = name if create_parents else _local_name(model, name)
            if local is None:
                continue
            if create_parents:
                from compressor.io.tensor_model import container

                container(model, local.rpartition(".")[0])
                kind = dtype
            else:
                kind = dtype or next(model.get_submodule(local).parameters()).dtype
            layer = build(spec, kind, device)
            layer.layout = spec.get("layout", "linear")
            replace_module(model, local, layer)
    return model


def _factorized(spec: dict, dtype: torch.dtype | None, device) -> FactorizedLinear:
    (out_f, in_f), rank, bias = spec["shape"], spec["rank"], spec["bias"]
    layer = FactorizedLinear(in_f, out_f, rank, 2, bias, dtype=dtype, device=device)
    quant = quant_spec(spec)
    if quant is not None:
        layer.down = QuantLinear(in_f, rank, quant, bias=False, device=device)
        layer.up = _quantized({**spec, "shape": [out_f, rank]}, dtype, device)
    return layer


def _quantized(spec: dict, dtype: torch.dtype | None, device) -> QuantLinear:
    (out_f, in_f), bias = spec["shape"], spec["bias"]
    layer = QuantLinear(in_f, out_f, quant_spec(spec), bias=bias, device=device)
    if layer.bias is not None and dtype is not None:
        layer.bias.data = layer.bias.data.to(dtype)
    return layer


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
