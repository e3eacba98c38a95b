"""Loading a dlnc export back: `load_pretrained`, the model with its factorized layers and
outputs identical to the model that was exported (a transformers export through
`from_pretrained` and the dlnc quantizer, a tensor-mode export as a `TensorModel`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from compressor.core.surgery import tied_keys
from compressor.errors import DlncError, first_line
from compressor.io.install import install_factorized
from compressor.io.section import check_export, export_files, read_section

__all__ = ["load_pretrained"]


def load_pretrained(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device_map: str | dict | None = None,
) -> nn.Module:
    """Load a dlnc export: the model with its factorized layers, outputs identical to the
    model that was exported.

    A transformers export goes through `from_pretrained` with the dlnc quantizer (the skeleton
    is built on the meta device, the dense weights are never allocated); `dtype` and
    `device_map` are passed to it. A tensor-mode export loads as a `TensorModel` (weights only)
    unless `model`, an instance of the original torch module, is given: its layers are then
    swapped for the exported factors and its weights loaded.
    """
    from compressor.io.checkpoint import read_state_dict

    folder = Path(path)
    section = read_section(folder)  # its own errors first
    files = export_files(folder)
    check_export(folder, section, files)  # as `from_pretrained` checks it (the dlnc quantizer)
    if model is None and not section.get("tensor_mode"):
        return _from_pretrained(folder, section, dtype, device_map)
    state = read_state_dict(files)
    try:
        model = _module_skeleton(section, state, model)
        _load_state(model, state)
    except (RuntimeError, KeyError, AttributeError, ValueError, TypeError) as e:
        raise DlncError(f"{folder}: weights do not match its config ({first_line(e)})") from e
    return model.eval()


def _module_skeleton(
    section: dict, state: dict[str, torch.Tensor], model: nn.Module | None
) -> nn.Module:
    """Tensor mode: a `TensorModel` (or the user's `model`) with the exported factorized layers."""
    from compressor.io.tensor_model import TensorModel

    layers, quantized = section.get("layers", {}), section.get("quantized", {})
    tensor_mode = model is None
    if tensor_mode:
        owned = tuple(f"{n}." for n in (*layers, *quantized))
        model = TensorModel({k: v for k, v in state.items() if not k.startswith(owned)})
    for name, spec in layers.items():
        dtype = _stored_dtype(state, f"{name}.up")
        install_factorized(model, {name: spec}, dtype=dtype, create_parents=tensor_mode)
    for name, spec in quantized.items():
        dtype = _stored_dtype(state, name)
        install_factorized(
            model, {}, quantized={name: spec}, dtype=dtype, create_parents=tensor_mode
        )
    return model


def _stored_dtype(state: dict[str, torch.Tensor], prefix: str) -> torch.dtype:
    """The dtype a layer's float tensors were stored in: its weight's, else its bias's
    (quantized), else float32."""
    for key in (f"{prefix}.weight", f"{prefix}.bias"):
        if key in state:
            return state[key].dtype
    return torch.float32


def _from_pretrained(
    folder: Path, section: dict, dtype: str | torch.dtype, device_map: str | dict | None
) -> nn.Module:
    """A transformers export through `from_pretrained` and the dlnc quantizer."""
    from transformers import AutoConfig, AutoModel

    from compressor.io.checkpoint import check_loading_info, model_class
    from compressor.io.hf import DlncQuantizationConfig, register

    register()
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = model_class(config, trust_remote_code=False) or AutoModel
    extra = {}
    if section.get("layers") and getattr(config, "quantization_config", None) is None:
        extra["quantization_config"] = DlncQuantizationConfig()  # written before it was stored
    try:
        model, info = cls.from_pretrained(
            str(folder), config=config, dtype=dtype, device_map=device_map,
            output_loading_info=True, local_files_only=True, **extra,
        )  # fmt: skip
    except DlncError:
        raise  # the quantizer's checks (compressor.io.section.check_export)
    except (RuntimeError, ValueError, OSError, KeyError, AttributeError) as e:
        raise DlncError(f"{folder}: weights do not match its config ({first_line(e)})") from e
    check_loading_info(model, info, [])
    return model.eval()


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(tied_keys(model))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        kind = "missing" if missing else "unexpected"
        raise KeyError(f"{kind} tensor {bad}")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
