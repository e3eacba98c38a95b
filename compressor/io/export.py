"""Writing a compressed model to a folder (atomically) and loading it back.

Layout of an export folder:
  model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
  config.json       the original config plus a `dlnc` section (format, method, layer ranks)
  report.json       the compression report
  tokenizer / processor files copied from the input folder
A factorized layer `<name>` is stored as `<name>.down.weight` (k x in), `<name>.up.weight`
(out x k) and `<name>.up.bias`; with `merge=True` it is stored dense under its original name
and layout, so any tool that reads the original architecture reads the export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import factorized_layers, replace_module, tied_keys
from compressor.errors import DlncError, first_line

__all__ = [
    "FORMAT_VERSION",
    "default_output_dir",
    "disk_size",
    "export",
    "export_state_dict",
    "load_pretrained",
    "write_folder",
]

FORMAT_VERSION = 1
COPIED = re.compile(
    r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model"
    r"|preprocessor_config\.json|processor_config\.json|image_processor.*|feature_extractor.*"
    r"|generation_config\.json|chat_template.*|modules\.json|sentence_bert_config\.json"
    r"|config_sentence_transformers\.json|\d+_[A-Za-z]+|README\.md)$"
)
"""Files and folders beside the weights that travel with the model (tokenizer, processor,
generation and sentence-transformers settings)."""


def default_output_dir(input_path: str | os.PathLike) -> Path:
    """`model.safetensors` -> `model-dlnc/`, `folder/` -> `folder-dlnc/` (beside the input)."""
    path = Path(input_path).resolve()
    stem = path.stem if path.is_file() else path.name
    return path.parent / f"{stem}-dlnc"


def check_output_dir(out_dir: Path, overwrite: bool, input_path: Path | None = None) -> None:
    """Refuse an existing output (unless `overwrite`) and an output that would hold the input."""
    out_dir = out_dir.resolve()
    if input_path is not None:
        src = input_path.resolve()
        if src == out_dir or out_dir in src.parents:
            raise DlncError(f"{out_dir}: the output folder would replace the input; pick another")
    if out_dir.exists() and not overwrite:
        raise DlncError(f"{out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DlncError(f"{out_dir} exists and is not a folder")


def export_state_dict(model: nn.Module, merge: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with every chain collapsed to two factors (or merged dense)."""
    state = model.state_dict()
    for name, layer in factorized_layers(model).items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        part = layer.to_dense() if merge else layer.collapse()
        state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    return state


def dlnc_section(model: nn.Module, method: str, merged: bool, tensor_mode: bool) -> dict:
    """The `dlnc` section of config.json: what load_pretrained needs to rebuild the layers."""
    layers = {
        name: {
            "rank": layer.rank,
            "shape": [layer.out_features, layer.in_features],
            "layout": layer.layout,
            "bias": layer.up.bias is not None,
        }
        for name, layer in factorized_layers(model).items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "merged": merged,
        "tensor_mode": tensor_mode,
        "layers": {} if merged else layers,
    }


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    config: object | None = None,
    source: str | os.PathLike | None = None,
    report: dict | None = None,
    method: str = "svd",
    merge: bool = False,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write the model to `out_dir` atomically: a hidden temp folder, renamed when complete.

    `config` is the transformers config (None in tensor mode); `source` the input folder whose
    tokenizer and processor files are copied.
    """
    section = dlnc_section(model, method, merge, config is None)
    return write_folder(
        out_dir,
        lambda folder: _write_weights(model, folder, merge, max_shard_size),
        config=config,
        section=section,
        source=source,
        report=report,
        overwrite=overwrite,
    )


def write_folder(
    out_dir: str | os.PathLike,
    write_weights: Callable[[Path], None],
    *,
    config: object | None,
    section: dict,
    source: str | os.PathLike | None = None,
    report: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """The export folder, atomically: `write_weights(tmp)` writes the weights into a hidden
    temp folder, then config.json (with the `dlnc` section), report.json and the side files
    join them, and the folder is renamed into place. Nothing is left behind on an error."""
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite, Path(source) if source else None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_weights(tmp)
        _write_json(tmp / "config.json", _config_dict(config, section))
        if report is not None:
            _write_json(tmp / "report.json", report)
        if source is not None:
            _copy_side_files(Path(source), tmp)
        _replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_weights(model: nn.Module, folder: Path, merge: bool, max_shard_size) -> None:
    from huggingface_hub import save_torch_state_dict

    state = {k: v.detach().cpu() for k, v in export_state_dict(model, merge).items()}
    save_torch_state_dict(
        state,
        folder,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
        shared_tensors_to_discard=tied_keys(model),
    )


def _config_dict(config: object | None, section: dict) -> dict:
    data = config.to_dict() if config is not None else {}
    data["dlnc"] = section
    return data


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _copy_side_files(source: Path, dest: Path) -> None:
    for entry in source.iterdir():
        if not COPIED.match(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / entry.name)
        else:
            shutil.copy2(entry, dest / entry.name)


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an old output is removed only after that."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def disk_size(paths: list[Path] | Path) -> int:
    """Bytes on disk of files (or of all files under a folder)."""
    if isinstance(paths, Path) and paths.is_dir():
        return sum(p.stat().st_size for p in paths.rglob("*") if p.is_file())
    items = [paths] if isinstance(paths, Path) else paths
    return sum(p.stat().st_size for p in items)


def load_pretrained(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a dlnc export: the model with its factorized layers, outputs identical to the
    model that was exported.

    The architecture comes from config.json; a tensor-mode export loads as a `TensorModel`
    (weights only) unless `model`, an instance of the original torch module, is given: its
    layers are then swapped for the exported factors and its weights loaded.
    """
    from compressor.io.checkpoint import read_state_dict

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise DlncError(f"{folder}: no config.json; is this a dlnc export?")
    section = json.loads(config_file.read_text()).get("dlnc")
    if section is None:
        raise DlncError(f"{folder}: config.json has no `dlnc` section; not a dlnc export")
    if section.get("format_version", 0) > FORMAT_VERSION:
        raise DlncError(f"{folder}: written by a newer dlnc (format {section['format_version']})")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DlncError(f"{folder}: no .safetensors weights")
    state = read_state_dict(files)
    try:
        model = _skeleton(config_file, section, state, model)
        _load_state(model, state)
    except (RuntimeError, KeyError, AttributeError) as e:
        raise DlncError(f"{folder}: weights do not match its config ({first_line(e)})") from e
    return model.eval()


def _skeleton(
    config_file: Path, section: dict, state: dict[str, torch.Tensor], model: nn.Module | None
) -> nn.Module:
    """The model's module tree with factorized layers where the export has them."""
    from compressor.io.tensor_model import TensorModel, container

    layers = section.get("layers", {})
    tensor_mode = bool(section.get("tensor_mode")) and model is None
    if tensor_mode:
        owned = tuple(f"{n}." for n in layers)
        model = TensorModel({k: v for k, v in state.items() if not k.startswith(owned)})
    elif model is None:
        model = _hf_skeleton(config_file)
    for name, spec in layers.items():
        out_f, in_f = spec["shape"]
        dtype = state[f"{name}.up.weight"].dtype
        layer = FactorizedLinear(in_f, out_f, spec["rank"], 2, spec["bias"], dtype=dtype)
        layer.layout = spec.get("layout", "linear")
        parent = name.rpartition(".")[0]
        if tensor_mode:
            container(model, parent)
        elif not isinstance(model.get_submodule(name), nn.Module):
            raise KeyError(f"no module at {name}")
        replace_module(model, name, layer)
    return model


def _hf_skeleton(config_file: Path) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    arch = next((a for a in (config.architectures or ()) if hasattr(transformers, a)), "AutoModel")
    cls = getattr(transformers, arch)
    return cls.from_config(config) if arch == "AutoModel" else cls(config)


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
