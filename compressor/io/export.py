"""Writing a compressed model to a folder, atomically (loading it back: compressor/io/load.py).

Layout of an export folder:
  model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
  config.json       the original config plus a `dlnc` section (format, method, layer ranks;
                    the provenance: dlnc version, base model, the commands of the chain);
                    factorized: `quantization_config` (quant_method dlnc) for from_pretrained,
                    the `transformers_weights` guard (LOAD_GUARD) and `auto_map`
  modeling_dlnc.py  factorized: the loader for `trust_remote_code=True` without dlnc
  report.json       the compression report (with `dlnc_version`)
  README.md         the model card (compressor/io/model_card.py)
  tokenizer / processor files copied from the input folder
A factorized layer `<name>` is stored as `<name>.down.weight` (k x in), `<name>.up.weight`
(out x k) and `<name>.up.bias`; with `format="dense"` it is stored dense under its original
name and layout, so any tool that reads the original architecture reads the export.
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

from compressor.core.layers import QuantLinear
from compressor.core.quantize import BITS
from compressor.core.surgery import factorized_layers, quantized_layers, tied_keys
from compressor.errors import DlncError
from compressor.io.card_facts import CardFacts
from compressor.io.files import check_writable, write_error
from compressor.io.section import (
    EXPORT_FORMATS,
    FORMAT_VERSION,
    PLAIN_VERSION,
    check_format,
    dlnc_version,
    format_version,
)

__all__ = [
    "EXPORT_FORMATS",
    "FORMAT_VERSION",
    "LOAD_GUARD",
    "QUANT_METHOD",
    "check_format",
    "check_output_dir",
    "check_shard_size",
    "default_output_dir",
    "disk_size",
    "dlnc_section",
    "export",
    "export_state_dict",
    "quantization_fields",
    "remove_stale_temps",
    "weights_metadata",
    "write_folder",
]

QUANT_METHOD = "dlnc"
"""`quantization_config.quant_method` of a factorized export: routes `from_pretrained` to the
dlnc quantizer (compressor/io/hf.py)."""
LOAD_GUARD = (
    "a dlnc factorized export: load it with `trust_remote_code=True` (transformers alone), or "
    "install dlnc from its source and `import compressor` before loading it; otherwise its "
    "factorized layers would load as random weights"
)
"""config.json's `transformers_weights` in a factorized export. transformers refuses a value
that is not a .safetensors name, with this text in its error, so loading without dlnc fails
loudly; the dlnc quantizer removes it before transformers looks for the weights."""
COPIED = re.compile(
    r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json|.*\.model"
    r"|preprocessor_config\.json|processor_config\.json|image_processor.*|feature_extractor.*"
    r"|generation_config\.json|chat_template.*|modules\.json|sentence_bert_config\.json"
    r"|config_sentence_transformers\.json|\d+_[A-Za-z]+|README\.md)$"
)
"""Files and folders beside the weights that travel with the model (tokenizer, processor,
generation and sentence-transformers settings)."""


def default_output_dir(input_path: str | os.PathLike, suffix: str = "dlnc") -> Path:
    """`model.safetensors` -> `model-dlnc/`, `folder/` -> `folder-dlnc/` (beside the input);
    a model in the Hugging Face cache (`org/name`) -> `name-dlnc/` in the working folder
    (`suffix` for `dlnc`: `dlnc quantize` writes `-int4`, `-int8`)."""
    from compressor.io.checkpoint import hub_cache_id

    hub = hub_cache_id(input_path)
    if hub is not None:
        return Path.cwd() / f"{hub.split('/')[1]}-{suffix}"
    path = Path(input_path).resolve()
    stem = path.stem if path.is_file() else path.name
    return path.parent / f"{stem}-{suffix}"


def check_output_dir(out_dir: Path, overwrite: bool, input_path: Path | None = None) -> None:
    """Refuse an existing output (unless `overwrite`), an output that would hold or sit
    inside the input (the input is never written to), and one that cannot be created."""
    out_dir = out_dir.resolve()
    if input_path is not None:
        src = input_path.resolve()
        _refuse_replacing(out_dir, src)
        if src.is_dir() and src in out_dir.parents:
            raise DlncError(
                f"{out_dir}: inside the input folder {src}, which dlnc never writes to; "
                "pick an output outside it"
            )
    if out_dir.exists() and not overwrite:
        raise DlncError(f"{out_dir} already exists; pass `overwrite` to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise DlncError(f"{out_dir} exists and is not a folder")
    check_writable(out_dir)


def _refuse_replacing(out_dir: Path, source: Path) -> None:
    if source == out_dir or out_dir in source.parents:
        raise DlncError(f"{out_dir}: the output folder would replace the input; pick another")


def check_shard_size(size: int | str) -> None:
    """`max_shard_size`: bytes (an int >= 1) or a size such as "2GB", "500MB" (KB/MB/GB/TB)."""
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
        return
    form = r"\s*\d+(\.\d*)?\s*[KMGT]B\s*"
    if isinstance(size, str) and re.fullmatch(form, size, re.I) and float(size.strip()[:-2]) > 0:
        return
    raise DlncError(f"`max_shard_size` must be a size such as 2GB or 500MB, got {size!r}")


def export_state_dict(model: nn.Module, format: str = "factors") -> dict[str, torch.Tensor]:
    """The model's state dict with every chain collapsed to two factors (`format` "factors")
    or multiplied back into a dense layer ("dense", quantized layers dequantized)."""
    check_format(format)
    state = model.state_dict()
    parts = dict(factorized_layers(model))
    if format == "dense":
        parts.update(quantized_layers(model))
    for name, layer in parts.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        part = layer.to_dense() if format == "dense" else layer.collapse()
        state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
    return state


def dlnc_section(model: nn.Module, method: str, format: str, tensor_mode: bool) -> dict:
    """The `dlnc` section of config.json: what load_pretrained needs to rebuild the layers
    (none when `format` is "dense": its `merged` is then true)."""
    check_format(format)
    merged = format == "dense"
    layers = {
        name: {
            "rank": layer.rank,
            "shape": [layer.out_features, layer.in_features],
            "layout": layer.layout,
            "bias": layer.up.bias is not None,
            **_quant_fields(layer.up),
        }
        for name, layer in factorized_layers(model).items()
    }
    quantized = {
        name: {
            "shape": [layer.out_features, layer.in_features],
            "layout": layer.layout,
            "bias": layer.bias is not None,
            **_quant_fields(layer),
        }
        for name, layer in quantized_layers(model).items()
    }
    section = {
        "format_version": PLAIN_VERSION,
        "method": method,
        "merged": merged,
        "tensor_mode": tensor_mode,
        "layers": {} if merged else layers,
    }
    if quantized and not merged:
        section["quantized"] = quantized
    return {**section, "format_version": format_version(section)}


def _quant_fields(part: nn.Module) -> dict:
    """A layer-table entry's `bits` and `group` for a quantized part, else nothing."""
    if not isinstance(part, QuantLinear):
        return {}
    if part.spec.bits not in BITS:
        raise DlncError(f"{part.spec.bits}-bit codes are not stored; export int8 or int4")
    return {"bits": part.spec.bits, "group": part.spec.group}


def export(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    config: object | None = None,
    source: str | os.PathLike | None = None,
    report: dict | None = None,
    method: str = "svd",
    format: str = "factors",
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write the model to `out_dir` atomically: a hidden temp folder, renamed when complete.

    `format` is one of `EXPORT_FORMATS` ("factors", or "dense": the layers multiplied back).
    `config` is the transformers config (None in tensor mode); `source` the input folder whose
    tokenizer and processor files are copied; `report` is written as report.json, its
    `bytes_after` (when present) set to the size of the weights written. A failed write
    (permission, read-only mount, full disk) is a one-line `DlncError` and leaves nothing;
    temp folders of earlier exports killed mid-write are removed.
    """
    from compressor.io.card_facts import card_facts

    section = dlnc_section(model, method, format, config is None)
    check_shard_size(max_shard_size)
    return write_folder(
        out_dir,
        lambda folder: _write_weights(model, folder, format, max_shard_size),
        config=config,
        section=section,
        source=source,
        report=report,
        overwrite=overwrite,
        facts=card_facts(model, method, format, report),
    )


def write_folder(
    out_dir: str | os.PathLike,
    write_weights: Callable[[Path], None],
    *,
    config: object | None,
    section: dict,
    source: str | os.PathLike | None = None,
    report: dict | Callable[[], dict] | None = None,
    overwrite: bool = False,
    facts: CardFacts | None = None,
) -> Path:
    """The export folder, atomically: `write_weights(tmp)` writes the weights into a hidden
    temp folder, then config.json (with the `dlnc` section), report.json, the side files and
    the model card (from `facts`, else from the report) join them, and the folder is renamed
    into place. The section, the report and the card record the provenance (the dlnc
    version, the base model, the commands; an export `source` passes on its own). `report`
    may be a function, called once the weights are written (a streamed export knows its
    per-layer errors only then). A failed write (permission, read-only
    mount, full disk) is a one-line `DlncError` and leaves nothing; temp folders of earlier
    exports killed mid-write go."""
    from safetensors import SafetensorError

    from compressor.io.card_facts import report_facts
    from compressor.io.model_card import provenance, write_model_card

    origin = provenance(source, config)
    section = {**section, **origin.section()}
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, overwrite)
    if source is not None:  # the folder of the input's side files (the input may sit in it)
        _refuse_replacing(out_dir, Path(source).resolve())
    remove_stale_temps(out_dir.parent)
    created = _make_parents(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    done = False
    try:
        tmp.mkdir()
        write_weights(tmp)
        if callable(report):
            report = report()
        _write_json(tmp / "config.json", _config_dict(config, section, tmp))
        if report is not None:
            report = {**_with_size(report, tmp), "dlnc_version": origin.version}
            _write_json(tmp / "report.json", report)
        if source is not None:
            _copy_side_files(Path(source), tmp)
        if facts is None and report is not None:
            facts = report_facts(report, section)
        if facts is not None:
            write_model_card(tmp, facts, config=config, source=source, origin=origin)
        _replace(tmp, out_dir)
        done = True
    except (OSError, SafetensorError) as e:
        raise write_error(out_dir, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done and created is not None:
            shutil.rmtree(created, ignore_errors=True)
    return out_dir


def _with_size(report: dict, folder: Path) -> dict:
    """The report with `bytes_after` (when it has that key) set to the weights written."""
    if "bytes_after" not in report:
        return report
    return {**report, "bytes_after": disk_size(sorted(folder.glob("*.safetensors")))}


def _make_parents(out_dir: Path) -> Path | None:
    """Create `out_dir`'s missing parent folders; the outermost one created (to remove if
    the export fails), or None."""
    missing = [p for p in out_dir.parents if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


_TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)(\.\w+)?$")  # folders, and atomic_path's files


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the `.NAME.tmp-PID` / `.NAME.old-PID` folders (and `.NAME.tmp-PID.png` files)
    in `folder` left by a dlnc process that is gone (killed mid-write); those of running
    processes stay."""
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = _TEMP.match(entry.name)
        if not match or _alive(int(match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or not a pid we can ask about): leave it
    return True


def _write_weights(model: nn.Module, folder: Path, format: str, max_shard_size) -> None:
    from huggingface_hub import save_torch_state_dict

    state = {k: v.detach().cpu() for k, v in export_state_dict(model, format).items()}
    save_torch_state_dict(
        state,
        folder,
        max_shard_size=max_shard_size,
        metadata=weights_metadata(),
        shared_tensors_to_discard=tied_keys(model),
    )


def weights_metadata() -> dict[str, str]:
    """The safetensors header metadata of an export's weights (of its index when sharded:
    huggingface_hub writes only the format into each shard, and the streamed writer does too)."""
    return {"format": "pt", "dlnc_version": dlnc_version()}


def _config_dict(config: object | None, section: dict, folder: Path) -> dict:
    """config.json: the model's config with the `dlnc` section; a factorized transformers
    export adds the fields `from_pretrained` reads, and `modeling_dlnc.py` in `folder` with the
    `auto_map` that loads it without dlnc (compressor/io/portable.py)."""
    from compressor.io.portable import write_portable

    data = config.to_dict() if config is not None else {}
    if (data.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        del data["quantization_config"]  # a model loaded by the dlnc quantizer: written afresh
    data["dlnc"] = section
    if config is not None and (section["layers"] or section.get("quantized")):
        data.update(quantization_fields(section["format_version"]))
    return write_portable(folder, config, data) if config is not None else data


def quantization_fields(version: int = PLAIN_VERSION) -> dict:
    """What a factorized transformers export adds to config.json for `from_pretrained`
    (`version`: its section's `format_version`)."""
    quant = {"quant_method": QUANT_METHOD, "format_version": version}
    return {"quantization_config": quant, "transformers_weights": LOAD_GUARD}


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
