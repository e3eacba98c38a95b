"""Writing a compressed model to a folder (atomically) and loading it back.

Layout of an export folder:
  model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
  config.json       the original config plus a `dlnc` section (format, method, layer ranks);
                    factorized: `quantization_config` (quant_method dlnc) for from_pretrained
                    and the `transformers_weights` guard (LOAD_GUARD)
  report.json       the compression report
  README.md         the model card (compressor/io/model_card.py)
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
from compressor.io.files import check_writable, write_error
from compressor.io.model_card import CardFacts
from compressor.io.section import FORMAT_VERSION, check_factors, read_section

__all__ = [
    "FORMAT_VERSION",
    "LOAD_GUARD",
    "QUANT_METHOD",
    "default_output_dir",
    "disk_size",
    "export",
    "export_state_dict",
    "install_factorized",
    "load_pretrained",
    "read_section",
    "write_folder",
]

QUANT_METHOD = "dlnc"
"""`quantization_config.quant_method` of a factorized export: routes `from_pretrained` to the
dlnc quantizer (compressor/io/hf.py)."""
LOAD_GUARD = (
    "a dlnc factorized export: `pip install dlnc` and `import compressor` before loading it, "
    "or its factorized layers would load as random weights"
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


def default_output_dir(input_path: str | os.PathLike) -> Path:
    """`model.safetensors` -> `model-dlnc/`, `folder/` -> `folder-dlnc/` (beside the input)."""
    path = Path(input_path).resolve()
    stem = path.stem if path.is_file() else path.name
    return path.parent / f"{stem}-dlnc"


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
    tokenizer and processor files are copied; `report` is written as report.json, its
    `bytes_after` (when present) set to the size of the weights written. A failed write
    (permission, read-only mount, full disk) is a one-line `DlncError` and leaves nothing;
    temp folders of earlier exports killed mid-write are removed.
    """
    from compressor.io.model_card import card_facts

    section = dlnc_section(model, method, merge, config is None)
    check_shard_size(max_shard_size)
    return write_folder(
        out_dir,
        lambda folder: _write_weights(model, folder, merge, max_shard_size),
        config=config,
        section=section,
        source=source,
        report=report,
        overwrite=overwrite,
        facts=card_facts(model, method, merge, report),
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
    into place. `report` may be a function, called once the weights are written (a streamed
    export knows its per-layer errors only then). A failed write (permission, read-only
    mount, full disk) is a one-line `DlncError` and leaves nothing; temp folders of earlier
    exports killed mid-write go."""
    from safetensors import SafetensorError

    from compressor.io.model_card import report_facts, write_model_card

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
        _write_json(tmp / "config.json", _config_dict(config, section))
        if report is not None:
            report = _with_size(report, tmp)
            _write_json(tmp / "report.json", report)
        if source is not None:
            _copy_side_files(Path(source), tmp)
        if facts is None and report is not None:
            facts = report_facts(report, section)
        if facts is not None:
            write_model_card(tmp, facts, config=config, source=source)
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
    if (data.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        del data["quantization_config"]  # a model loaded by the dlnc quantizer: written afresh
    data["dlnc"] = section
    if config is not None and section["layers"]:
        data.update(quantization_fields())
    return data


def quantization_fields() -> dict:
    """What a factorized transformers export adds to config.json for `from_pretrained`."""
    quant = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
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
    from compressor.io.checkpoint import read_shapes, read_state_dict

    folder = Path(path)
    section = read_section(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DlncError(f"{folder}: no .safetensors weights")
    check_factors(folder, section, read_shapes(files))
    if model is None and not section.get("tensor_mode"):
        return _from_pretrained(folder, section, dtype, device_map)
    state = read_state_dict(files)
    try:
        model = _module_skeleton(section, state, model)
        _load_state(model, state)
    except (RuntimeError, KeyError, AttributeError, ValueError, TypeError) as e:
        raise DlncError(f"{folder}: weights do not match its config ({first_line(e)})") from e
    return model.eval()


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


def _module_skeleton(
    section: dict, state: dict[str, torch.Tensor], model: nn.Module | None
) -> nn.Module:
    """Tensor mode: a `TensorModel` (or the user's `model`) with the exported factorized layers."""
    from compressor.io.tensor_model import TensorModel

    layers = section.get("layers", {})
    tensor_mode = model is None
    if tensor_mode:
        owned = tuple(f"{n}." for n in layers)
        model = TensorModel({k: v for k, v in state.items() if not k.startswith(owned)})
    for name, spec in layers.items():
        dtype = state[f"{name}.up.weight"].dtype
        install_factorized(model, {name: spec}, dtype=dtype, create_parents=tensor_mode)
    return model


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
