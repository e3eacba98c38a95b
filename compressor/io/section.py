"""The `dlnc` section of an export's config.json, read and checked before anything is built,
and the export formats (`EXPORT_FORMATS`) whose choice it records (`merged`).

    "dlnc": {"format_version": 1, "method": "svd", "merged": false, "tensor_mode": false,
             "layers": {"<name>": {"rank": 4, "shape": [out, in], "layout": "linear",
                                   "bias": true}}}

A hand-edited or damaged section is a one-line `DlncError` that names the key, or the tensor
with the shape the section expects and the one the weights hold. `check_export` is every check
an export gets before anything is built, by `load_pretrained` and by `from_pretrained` (the
dlnc quantizer, compressor/io/hf.py) alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.errors import DlncError

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_VERSION",
    "check_export",
    "check_factors",
    "check_format",
    "check_section",
    "dlnc_version",
    "export_files",
    "is_export",
    "read_config",
    "read_section",
]

FORMAT_VERSION = 1
LAYOUTS = ("linear", "conv1d")
EXPORT_FORMATS = ("factors", "dense")
"""How factorized layers are written: as their two factors (reloaded by dlnc), or multiplied
back into dense weights of the original architecture (any tool reads them; no smaller)."""


def dlnc_version() -> str:
    """The installed dlnc's version (its package metadata), recorded in every export; "unknown"
    when run from a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dlnc")
    except PackageNotFoundError:
        return "unknown"


def check_format(format: str) -> None:
    """A one-line `DlncError` unless `format` is one of `EXPORT_FORMATS`."""
    if format not in EXPORT_FORMATS:
        raise DlncError(f"`format` must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of `folder` as a mapping; invalid JSON is a `DlncError`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise DlncError(f"{folder}: no config.json; is this a dlnc export?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DlncError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DlncError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_export(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a config.json with a `dlnc` section (a dlnc export)."""
    return (Path(folder) / "config.json").is_file() and "dlnc" in read_config(folder)


def read_section(folder: str | os.PathLike) -> dict:
    """The checked `dlnc` section of the export at `folder`."""
    return check_section(read_config(folder).get("dlnc"), folder)


def export_files(folder: str | os.PathLike) -> list[Path]:
    """The export's weight files: those its index lists (each must exist), else every
    .safetensors file of `folder`."""
    from compressor.io.checkpoint import weight_files

    folder = Path(folder)
    if not any(folder.glob("*.safetensors*")):
        raise DlncError(f"{folder}: no .safetensors weights")
    return weight_files(folder, allow_pickle=False)[1]


def check_export(folder: str | os.PathLike, section: object, files: Sequence[Path]) -> dict:
    """`section` (config.json's `dlnc` value) checked, every weight file present, and the
    factors of every layer it lists there, of the shapes it implies, and none of a layer it
    does not list; the checked section. `folder` names the export in messages."""
    from compressor.io.checkpoint import read_shapes

    section = check_section(section, folder)
    for f in files:
        if not Path(f).is_file():
            raise DlncError(f"{f}: weight file listed in the index is missing")
    check_factors(folder, section, read_shapes([Path(f) for f in files]))
    return section


def check_section(section: object, folder: str | os.PathLike) -> dict:
    """`section`, the `dlnc` value of the config.json in `folder`, checked: a mapping of the
    format this dlnc reads, with a well-formed layer table."""
    where = f"{folder}: config.json's `dlnc` section"
    if section is None:
        raise DlncError(f"{folder}: config.json has no `dlnc` section; not a dlnc export")
    if not isinstance(section, dict):
        raise DlncError(f"{where} must be a mapping, got {type(section).__name__}")
    version = section.get("format_version", 0)
    if not _is_int(version) or version < 0:
        raise DlncError(f"{where}: `format_version` must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DlncError(f"{folder}: written by a newer dlnc (format {version})")
    for key in ("merged", "tensor_mode"):
        if not isinstance(section.get(key, False), bool):
            raise DlncError(f"{where}: `{key}` must be true or false, got {section[key]!r}")
    layers = section.get("layers", {})
    if not isinstance(layers, dict):
        raise DlncError(f"{where}: `layers` must be a mapping, got {type(layers).__name__}")
    for name, spec in layers.items():
        _check_layer(where, name, spec)
    return section


def _pair(up: Sequence[int], down: Sequence[int]) -> bool:
    """Two shapes that are the factors of one layer: [out, rank] and [rank, in]."""
    return len(up) == 2 and len(down) == 2 and up[1] == down[0]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layer(where: str, name: str, spec: object) -> None:
    if not isinstance(spec, dict):
        raise DlncError(f"{where}: layer {name} must be a mapping, got {type(spec).__name__}")
    rank, shape = spec.get("rank"), spec.get("shape")
    if not _is_int(rank) or rank < 1:
        raise DlncError(f"{where}: rank of {name} must be an integer >= 1, got {rank!r}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) for d in shape)):
        raise DlncError(f"{where}: shape of {name} must be [out, in], got {shape!r}")
    if min(shape) < 1:
        raise DlncError(f"{where}: shape of {name} must be positive, got {shape}")
    if spec.get("layout", "linear") not in LAYOUTS:
        raise DlncError(
            f"{where}: layout of {name} must be one of {LAYOUTS}, got {spec['layout']!r}"
        )
    if not isinstance(spec.get("bias", False), bool):
        raise DlncError(f"{where}: bias of {name} must be true or false, got {spec['bias']!r}")


def check_factors(
    folder: str | os.PathLike, section: dict, shapes: Mapping[str, Sequence[int]]
) -> None:
    """Every layer of the section has its factors in `shapes` (tensor name -> shape, e.g.
    from the safetensors headers), of the shapes the section implies; factors of a layer the
    section does not list (it would load as a randomly initialised dense layer) are refused."""
    layers = section.get("layers", {})
    for key, up in shapes.items():
        name = key.removesuffix(".up.weight")
        down = shapes.get(f"{name}.down.weight")
        if name != key and name not in layers and down is not None and _pair(up, down):
            raise DlncError(
                f"{folder}: {name} is stored as factors ({key}), but the `dlnc` section does "
                "not list it"
            )
    for name, spec in layers.items():
        (out_f, in_f), rank = spec["shape"], spec["rank"]
        expected = {f"{name}.up.weight": [out_f, rank], f"{name}.down.weight": [rank, in_f]}
        if spec.get("bias", False):
            expected[f"{name}.up.bias"] = [out_f]
        for key, shape in expected.items():
            found = shapes.get(key)
            if found is None:
                raise DlncError(f"{folder}: the `dlnc` section lists {name}, but there is no {key}")
            if list(found) != shape:
                raise DlncError(
                    f"{folder}: {name} (rank {rank}, shape {[out_f, in_f]} in the `dlnc` "
                    f"section): expected {key} of shape {shape}, found {list(found)}"
                )
