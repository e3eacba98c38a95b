"""The `dlnc` section of an export's config.json, read and checked before anything is built,
and the export formats (`EXPORT_FORMATS`) whose choice it records (`merged`).

    "dlnc": {"format_version": 1, "method": "svd", "merged": false, "tensor_mode": false,
             "layers": {"<name>": {"rank": 4, "shape": [out, in], "layout": "linear",
                                   "bias": true}},
             "quantized": {"<name>": {"shape": [out, in], "layout": "linear", "bias": true,
                                      "bits": 4, "group": 64}}}

A quantized export (format 2) stores integer codes, scales and zero points instead of float
weights (`QuantLinear`, compressor/core/quantize.py): a factorized layer's entry gains `bits`
and `group` (both factors quantized so), and `quantized` lists the targeted layers left dense
and quantized.

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

from compressor.core.quantize import BITS, QuantSpec
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
    "format_version",
    "is_export",
    "quant_spec",
    "read_config",
    "read_section",
]

FORMAT_VERSION = 2
"""The newest format this dlnc reads and writes: 2 for a quantized export, else 1 (so a dlnc
that reads format 1 still reads every export without quantized weights)."""
PLAIN_VERSION = 1
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
    quantized = section.get("quantized", {})
    if not isinstance(quantized, dict):
        raise DlncError(f"{where}: `quantized` must be a mapping, got {type(quantized).__name__}")
    for name, spec in quantized.items():
        _check_layer(where, name, {"rank": 1, **spec} if isinstance(spec, dict) else spec)
        if quant_spec(spec) is None:
            raise DlncError(f"{where}: quantized layer {name} needs `bits` and `group`")
    return section


def format_version(section: Mapping) -> int:
    """The format an export with this section needs (2 with quantized weights, else 1)."""
    quantized = section.get("quantized") or any(
        "bits" in spec for spec in section.get("layers", {}).values()
    )
    return FORMAT_VERSION if quantized else PLAIN_VERSION


def quant_spec(spec: Mapping) -> QuantSpec | None:
    """The quantization of a layer-table entry (checked by `check_section`), None if float."""
    return QuantSpec(spec["bits"], spec["group"]) if "bits" in spec else None


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
    if "bits" in spec or "group" in spec:
        bits, group = spec.get("bits"), spec.get("group")
        if bits not in BITS or not _is_int(group) or group < 0:
            raise DlncError(
                f"{where}: {name} must have `bits` one of {BITS} and `group` an integer >= 0, "
                f"got bits {bits!r}, group {group!r}"
            )


def check_factors(
    folder: str | os.PathLike, section: dict, shapes: Mapping[str, Sequence[int]]
) -> None:
    """Every layer of the section has its factors in `shapes` (tensor name -> shape, e.g.
    from the safetensors headers), of the shapes the section implies; factors of a layer the
    section does not list (it would load as a randomly initialised dense layer) are refused."""
    layers = section.get("layers", {})
    quantized = section.get("quantized", {})
    for key in shapes:
        owner = key.removesuffix(".qweight")
        layer = owner.removesuffix(".up").removesuffix(".down")
        if owner != key and owner not in quantized and layer not in layers:
            raise DlncError(
                f"{folder}: {owner} is stored quantized ({key}), but the `dlnc` section does "
                "not list it"
            )
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
        quant = quant_spec(spec)
        expected = {
            **_stored(f"{name}.up", out_f, rank, quant),
            **_stored(f"{name}.down", rank, in_f, quant),
        }
        if spec.get("bias", False):
            expected[f"{name}.up.bias"] = [out_f]
        _expect(folder, shapes, expected, name, f"rank {rank}, shape {[out_f, in_f]}")
    for name, spec in quantized.items():
        (out_f, in_f), quant = spec["shape"], quant_spec(spec)
        expected = _stored(name, out_f, in_f, quant)
        if spec.get("bias", False):
            expected[f"{name}.bias"] = [out_f]
        _expect(folder, shapes, expected, name, f"quantized, shape {[out_f, in_f]}")


def _stored(prefix: str, out_f: int, in_f: int, quant: QuantSpec | None) -> dict[str, list[int]]:
    """The tensors a weight of out_f x in_f is stored as, by key: float, or quantized."""
    if quant is None:
        return {f"{prefix}.weight": [out_f, in_f]}
    return {f"{prefix}.{k}": v for k, v in quant.stored_shapes(out_f, in_f).items()}


def _expect(
    folder, shapes: Mapping, expected: dict[str, list[int]], name: str, detail: str
) -> None:
    """Each of `expected` (key -> shape) in `shapes`; `name` and `detail` for the message."""
    for key, shape in expected.items():
        found = shapes.get(key)
        if found is None:
            raise DlncError(f"{folder}: the `dlnc` section lists {name}, but there is no {key}")
        if list(found) != shape:
            raise DlncError(
                f"{folder}: {name} ({detail} in the `dlnc` section): expected {key} of "
                f"shape {shape}, found {list(found)}"
            )
