"""Loading the user's checkpoint: a Hugging Face folder, a bare weights file, or tensor mode.

Safetensors only by default. Pickle formats (`.bin`, `.pt`, `.pth`) can run arbitrary code
when loaded, so they are refused unless `allow_pickle=True`, and even then they are read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.core.surgery import tied_keys
from compressor.errors import DlncError, first_line
from compressor.io.tensor_model import TensorModel

__all__ = [
    "LoadedCheckpoint",
    "check_loading_info",
    "hub_cache_id",
    "load_checkpoint",
    "model_class",
    "read_config",
    "read_shapes",
    "read_state_dict",
    "resolve_model",
    "weight_files",
]

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NOT_WEIGHTS = "not a weights file torch can load safely; nothing in it was run"
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # org/name
CACHE_PATH = re.compile(r"models--([\w.-]+?)--([\w.-]+)")  # the Hub cache's folder of org/name


def hub_cache_id(path: str | os.PathLike) -> str | None:
    """`org/name` when `path` lies in the Hugging Face cache's folder of that model
    (`models--org--name/snapshots/<commit>`), else None."""
    found = CACHE_PATH.search(str(path))
    return f"{found.group(1)}/{found.group(2)}" if found else None


def resolve_model(model: str | os.PathLike, revision: str | None = None) -> Path:
    """The local path of `model`: a file or folder as given, or a Hub name (`org/name`, when
    no such path exists) found in the local Hugging Face cache, offline, at `revision` (a
    branch, tag or commit; the cache's `main` by default). Nothing is downloaded."""
    path = Path(model)
    resolved = path.parent.name == "snapshots" and hub_cache_id(path) is not None
    if path.exists() or not HUB_NAME.fullmatch(str(model)):
        if revision is not None and not resolved:
            raise DlncError(f"`revision` picks a snapshot of a Hub name (org/name), not of {path}")
        return path  # (a missing path gets load_checkpoint's error)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        at = f" at revision {revision}" if revision else ""
        raise DlncError(
            f"{model}: no such file or folder, and not in the local Hugging Face cache{at} "
            f"({constants.HF_HUB_CACHE}); download it first (hf download {model})"
        ) from e


@dataclass
class LoadedCheckpoint:
    """A model ready to compress, and where it came from."""

    model: nn.Module
    source: Path  # the folder holding the weights (tokenizer files are copied from here)
    weight_files: list[Path]
    config: object | None = None  # a transformers PretrainedConfig, None in tensor mode
    notices: list[str] = field(default_factory=list)  # things the user should be told

    @property
    def tensor_mode(self) -> bool:
        return self.config is None

    @property
    def model_type(self) -> str | None:
        return getattr(self.config, "model_type", None)


def load_checkpoint(
    path: str | os.PathLike,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    tensor_mode: bool = False,
) -> LoadedCheckpoint:
    """Load a model folder or weights file.

    Tensor mode (the state dict's 2-D weights, no architecture) is used when there is no
    config.json, or when `tensor_mode=True`; a config of an architecture transformers does
    not know is an error that suggests tensor mode.
    """
    path = Path(path)
    if not path.exists():
        raise DlncError(f"{path}: no such file or folder")
    folder, files = weight_files(path, allow_pickle)
    _validate(files)
    config_file = Path(config) if config else folder / "config.json"
    if config and not config_file.is_file():
        raise DlncError(f"{config_file}: no such config file")
    notices: list[str] = []
    hf_config = None
    if config_file.is_file() and not tensor_mode:
        hf_config = read_config(config_file, trust_remote_code)
    if hf_config is None:
        if not tensor_mode:
            notices.append(f"no config.json beside {path.name}: tensor mode (2-D weights only)")
        model = TensorModel(read_state_dict(files))
        return LoadedCheckpoint(model, folder, files, None, notices)
    model = _load_hf_model(hf_config, config_file, files, trust_remote_code, notices)
    return LoadedCheckpoint(model, folder, files, hf_config, notices)


def weight_files(path: Path, allow_pickle: bool) -> tuple[Path, list[Path]]:
    if path.is_file():
        _check_format(path, allow_pickle)
        return path.parent, [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return path, [path / n for n in names]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return path, found
    pickled = sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
    if pickled:
        _check_format(pickled[0], allow_pickle)
        return path, pickled
    raise DlncError(f"{path}: no .safetensors weights in this folder")


def _check_format(path: Path, allow_pickle: bool) -> None:
    if path.suffix in SAFE_SUFFIXES:
        return
    if path.suffix in PICKLE_SUFFIXES:
        if allow_pickle:
            return
        raise DlncError(
            f"{path} is a pickle file, which can run arbitrary code when loaded; "
            "convert it to safetensors, or pass `allow_pickle` if you trust its source"
        )
    raise DlncError(f"{path}: not a safetensors file (give a .safetensors file or a folder)")


def _validate(files: list[Path]) -> None:
    """Open each safetensors file's header: a damaged or truncated file fails here, cheaply."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        if not f.is_file():
            raise DlncError(f"{f}: weight file listed in the index is missing")
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(f, framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise DlncError(f"{f}: not a valid safetensors file ({first_line(e)})") from e


def read_shapes(files: list[Path]) -> dict[str, list[int]]:
    """The shape of every tensor of the given safetensors files, from their headers only."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                shapes.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise DlncError(f"{f}: not a valid safetensors file ({first_line(e)})") from e
    return shapes


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the given weight files, with a one-line error for a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise DlncError(f"{f}: weight file listed in the index is missing")
        if f.suffix in PICKLE_SUFFIXES:
            state.update(_load_pickle(f))
            continue
        try:
            state.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise DlncError(f"{f}: not a valid safetensors file ({first_line(e)})") from e
    if not state:
        raise DlncError(f"{files[0]}: holds no tensors")
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with `weights_only=True` (no code of the file runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise DlncError(f"{path}: {NOT_WEIGHTS} ({first_line(e)})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DlncError(f"{path}: {NOT_WEIGHTS} (it holds a {type(state).__name__})")
    return state


def read_config(config_file: Path, trust_remote_code: bool):
    """The transformers config; a known architecture with a bad value (`n_layer: null`) and
    an unknown one are both one-line errors (transformers raises many kinds for the first)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DlncError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise DlncError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    try:
        return AutoConfig.from_pretrained(
            str(config_file), trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as e:
        kind = raw.get("model_type")
        if isinstance(kind, str) and kind in CONFIG_MAPPING:
            raise DlncError(f"{config_file}: not a valid {kind} config ({first_line(e)})") from e
        hint = " or `trust_remote_code`" if "auto_map" in raw else ""
        raise DlncError(
            f"{config_file}: unknown architecture (model_type {kind!r}); "
            f"pass `tensor_mode`{hint} to compress its 2-D weights directly"
        ) from e


def model_class(config, trust_remote_code: bool):
    """The first class of config.json's `architectures` that transformers has."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise DlncError(
            f"config.json: `architectures` must be a list of class names, got {archs!r}"
        )
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if trust_remote_code and getattr(config, "auto_map", None):
        return transformers.AutoModel
    return None


def _load_hf_model(config, config_file, files, trust_remote_code, notices) -> nn.Module:
    cls = model_class(config, trust_remote_code)
    if cls is None:
        from transformers import AutoModel

        cls = AutoModel
        notices.append(f"config.json names no architecture; loading the base {config.model_type}")
    with tempfile.TemporaryDirectory(prefix="dlnc-load-") as staging:
        folder = _stage(Path(staging), config_file, files)
        try:
            model, info = cls.from_pretrained(
                str(folder),
                config=config,
                output_loading_info=True,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                use_safetensors=files[0].suffix == ".safetensors",
                ignore_mismatched_sizes=True,  # reported below, naming the tensor and shapes
            )
        except pickle.UnpicklingError as e:
            raise DlncError(f"{files[0]}: {NOT_WEIGHTS} ({first_line(e)})") from e
        except (RuntimeError, ValueError, OSError) as e:
            raise DlncError(f"weights do not match the config: {first_line(e)}") from e
        except Exception as e:  # the architecture's own code fails on a value of the config
            raise DlncError(
                f"{config_file}: {cls.__name__} cannot be built from this config "
                f"({type(e).__name__}: {first_line(e)})"
            ) from e
    check_loading_info(model, info, notices)
    model.eval()
    return model


def _stage(staging: Path, config_file: Path, files: list[Path]) -> Path:
    """A folder that from_pretrained understands: config.json + weights under standard names."""
    if len(files) > 1:
        if config_file.parent == files[0].parent:
            return files[0].parent
        return _link_all(staging, config_file, files)
    os.symlink(config_file.resolve(), staging / "config.json")
    name = "model.safetensors" if files[0].suffix == ".safetensors" else "pytorch_model.bin"
    os.symlink(files[0].resolve(), staging / name)
    return staging


def _link_all(staging: Path, config_file: Path, files: list[Path]) -> Path:
    os.symlink(config_file.resolve(), staging / "config.json")
    for f in files[0].parent.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), staging / f.name)
    return staging


def check_loading_info(model: nn.Module, info: dict, notices: list[str]) -> None:
    """Missing tensors, tensors of the wrong shape, and tensors of a layer the config does
    not have (more layers in the weights than in the config) are errors; other unused
    tensors (a head the class has no place for, as bert-base's next-sentence head) a notice."""
    tied = set(tied_keys(model))
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    if missing:
        raise DlncError(
            f"weights do not match the config: {len(missing)} missing, e.g. {missing[0]}"
        )
    mismatched = sorted(info.get("mismatched_keys", ()), key=lambda m: m[0])
    if mismatched:
        key, found, expected = mismatched[0]
        raise DlncError(
            f"weights do not match the config: shape of {key} is {list(found)} in the weights, "
            f"{list(expected)} by the config ({len(mismatched)} tensors differ)"
        )
    unexpected = sorted(info.get("unexpected_keys", ()))
    own = {_layer_pattern(k) for k in model.state_dict()}
    extra = [k for k in unexpected if _layer_pattern(k) in own]
    if extra:
        raise DlncError(
            f"weights do not match the config: {len(extra)} tensors not used by the config, "
            f"e.g. {extra[0]} (does the config have fewer layers than the weights?)"
        )
    if unexpected:
        notices.append(
            f"{len(unexpected)} tensors of the weights have no place in "
            f"{type(model).__name__} and are left out, e.g. {unexpected[0]}"
        )


def _layer_pattern(key: str) -> str:
    """`transformer.h.7.attn.weight` -> `transformer.h.*.attn.weight`: a tensor of the
    model's own kind of layer, whatever its index."""
    return re.sub(r"\.\d+(?=\.)", ".*", key)
