"""Where the targeted weights come from: a checkpoint read tensor by tensor onto the model's
module tree built on the meta device (no weights), or a model already in memory. Either way a
layer's weight is read through a `WeightReader`, so methods and solvers never know which."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.core.compress import check_finite
from compressor.core.layers import in_linear_layout, layout_of
from compressor.core.ranks import LayerRank
from compressor.core.surgery import tied_keys
from compressor.errors import DlncError
from compressor.io.checkpoint import (
    LoadedCheckpoint,
    check_loading_info,
    model_class,
    read_config,
    weight_files,
)
from compressor.io.streaming import TensorSource, meta_model
from compressor.io.tensor_model import TensorModel

__all__ = [
    "LayerSpec",
    "NotStreamable",
    "StreamedCheckpoint",
    "WeightReader",
    "open_streamed",
    "release",
]


class NotStreamable(Exception):
    """This checkpoint or these options need the in-memory path (the message says why)."""


@dataclass
class LayerSpec:
    """One targeted layer of a streamed checkpoint: where its tensors are, and its shape."""

    weight_key: str
    bias_key: str | None
    shape: tuple[int, int]  # (out, in), the nn.Linear layout
    layout: str
    dtype: torch.dtype
    bias: bool
    decision: LayerRank | None = None  # the rank chosen for it, once allocated


@dataclass(frozen=True)
class WeightReader:
    """A targeted weight (Linear layout), read from the checkpoint each time it is called and
    checked for NaN/Inf as it is read (unless `checked` is off: pass 1 has checked it): the
    decompositions read it when they need it and do not hold it in between."""

    source: TensorSource
    name: str  # the layer, for the NaN/Inf error
    key: str
    layout: str
    shape: tuple[int, int]
    checked: bool = True

    def __call__(self) -> torch.Tensor:
        weight = in_linear_layout(self.source.get(self.key), self.layout)
        if self.checked:
            check_finite(self.name, weight)
        return weight

    def unchecked(self) -> WeightReader:
        return WeightReader(self.source, self.name, self.key, self.layout, self.shape, False)

    def row_blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """The weight's rows (Linear layout) `rows` at a time, read piece by piece."""
        if self.layout == "linear":
            piece = rows * self.source.specs[self.key].nbytes // self.shape[0]
            return self._checked(self.source.pieces(self.key, piece))
        return self._checked(self.source.columns(self.key, rows))  # stored transposed

    def column_blocks(self, columns: int) -> Iterator[torch.Tensor]:
        """W^T's rows (the weight's columns, Linear layout) `columns` at a time."""
        if self.layout == "linear":
            return self._checked(self.source.columns(self.key, columns))
        piece = columns * self.source.specs[self.key].nbytes // self.shape[1]
        return self._checked(self.source.pieces(self.key, piece))

    def _checked(self, blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for block in blocks:
            if self.checked:
                check_finite(self.name, block)
            yield block


@dataclass
class StreamedCheckpoint:
    """A checkpoint opened for streaming: its module tree on the meta device (`loaded.model`),
    its tensors' index, and which checkpoint key holds each state-dict key (None: a buffer
    the model computes itself)."""

    loaded: LoadedCheckpoint
    tensors: TensorSource
    keys: dict[str, str | None]

    def layer(self, name: str, module: nn.Module) -> LayerSpec:
        """Where a targeted layer's tensors are (its weight's shape checked against the
        config)."""
        layout = layout_of(module)
        weight_key = self.keys[f"{name}.weight"]
        spec = self.tensors.specs[weight_key]
        stored = tuple(module.weight.shape)
        if spec.shape != stored:
            raise DlncError(f"weights do not match the config: shape mismatch at {weight_key}")
        shape = (stored[1], stored[0]) if layout == "conv1d" else stored
        has_bias = module.bias is not None
        bias_key = self.keys.get(f"{name}.bias") if has_bias else None
        return LayerSpec(weight_key, bias_key, shape, layout, spec.dtype, has_bias)

    def reader(self, name: str, layer: LayerSpec, checked: bool = True) -> WeightReader:
        return WeightReader(
            self.tensors, name, layer.weight_key, layer.layout, layer.shape, checked
        )


def open_streamed(path: str | os.PathLike, load) -> StreamedCheckpoint:
    """The checkpoint at `path` opened for streaming (`load`: the loading options, with
    `config`, `allow_pickle`, `trust_remote_code`, `tensor_mode`); `NotStreamable` when its
    tensors do not match the model's keys, or it needs the in-memory loader."""
    loaded, tensors = _open(Path(path), load)
    keys = _key_map(loaded.model, tensors)
    _check_tensors(loaded, tensors, keys)
    return StreamedCheckpoint(loaded, tensors, keys)


def _open(path: Path, load) -> tuple[LoadedCheckpoint, TensorSource]:
    """The checkpoint's module tree on the meta device and its tensors' index."""
    if not path.exists():
        raise DlncError(f"{path}: no such file or folder")
    folder, files = weight_files(path, load.allow_pickle)
    if any(f.suffix != ".safetensors" for f in files):
        raise NotStreamable("pickle weights are read whole")
    tensors = TensorSource(files)
    config_file = Path(load.config) if load.config else folder / "config.json"
    if load.config and not config_file.is_file():
        raise DlncError(f"{config_file}: no such config file")
    if load.tensor_mode or not config_file.is_file():
        notices = [] if load.tensor_mode else [tensor_mode_notice(path)]
        model = TensorModel(tensors.meta_state())
        return LoadedCheckpoint(model, folder, files, None, notices), tensors
    config = read_config(config_file, load.trust_remote_code)
    cls = model_class(config, load.trust_remote_code)
    if cls is None or not hasattr(cls, "config_class"):
        raise NotStreamable("config.json names no model class")
    return LoadedCheckpoint(meta_model(cls, config), folder, files, config, []), tensors


def tensor_mode_notice(path: Path) -> str:
    return f"no config.json beside {path.name}: tensor mode (2-D weights only)"


def _key_map(model: nn.Module, source: TensorSource) -> dict[str, str | None]:
    """Model state-dict key -> checkpoint key (None: a buffer the model computes itself).

    Checkpoints saved from the base model lack (or have extra) `base_model_prefix.`; a
    checkpoint that keeps the names transformers renamed since (ViT's `encoder.layer.0.
    attention.attention.query`, now `layers.0.attention.q_proj`) is read through
    transformers' own renaming (`_renamed`); a tensor it must convert (split, merge) is
    left to its loader (the in-memory path)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    buffers = dict(model.named_buffers())
    tied = set(tied_keys(model))
    state = model.state_dict()
    renamed: dict[str, str] | None = None
    found: dict[str, str | None] = {}
    for key in state:
        candidates = [key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")] if prefix else [key]
        hit = next((c for c in candidates if c in source), None)
        if hit is None:
            renamed = _renamed(model, source, state) if renamed is None else renamed
            hit = renamed.get(key)
        if hit is None and key not in buffers and key not in tied:
            raise NotStreamable(f"the checkpoint has no tensor {key}")
        found[key] = hit
    return found


def _renamed(model: nn.Module, source: TensorSource, state: dict) -> dict[str, str]:
    """Model key -> checkpoint key for the checkpoint keys transformers' loader only renames
    (as `from_pretrained` does: its conversion mapping, then the base-model prefix)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # a transformers without conversion mappings renames nothing
        return {}
    if not hasattr(model, "config"):
        return {}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    out: dict[str, str] = {}
    for src in source.specs:
        key, converted = rename_source_key(src, renamings, converters, prefix, state)
        if converted is None and key in state:
            out.setdefault(key, src)
    return out


def _check_tensors(loaded: LoadedCheckpoint, source: TensorSource, keys) -> None:
    """The in-memory path's loading checks (`check_loading_info`), from the files' headers: a
    tensor of the wrong shape, or tensors of a layer the config does not have, are errors;
    other unused tensors a notice."""
    state = loaded.model.state_dict()
    mismatched = [
        (key, source.specs[src].shape, tuple(state[key].shape))
        for key, src in keys.items()
        if src is not None and tuple(source.specs[src].shape) != tuple(state[key].shape)
    ]
    used = set(keys.values())
    unexpected = [k for k in source.specs if k not in used]
    info = {"mismatched_keys": mismatched, "unexpected_keys": unexpected}
    check_loading_info(loaded.model, info, loaded.notices)


def release(model: nn.Module) -> None:
    """Send the parameters the block loop loaded back to the meta device, and re-tie."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and not p.is_meta:
                module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
