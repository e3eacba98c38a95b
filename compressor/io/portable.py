"""What makes a factorized export load without dlnc: `modeling_dlnc.py` (the template
compressor/io/modeling_dlnc.py, torch and transformers only) copied beside the weights, and
config.json's `auto_map` pointing every `AutoModel*` class that builds the architecture at its
loaders there, so `AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)` works
where dlnc is not installed. Without `trust_remote_code`, transformers ignores both and a load
goes through the dlnc quantizer (compressor/io/hf.py) as before."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["MODULE", "auto_class_for", "auto_map", "is_own", "write_portable"]

MODULE = "modeling_dlnc"
"""The module's name in an export (`auto_map` values are `modeling_dlnc.<class>`)."""


def _auto_classes(config: object) -> list[str]:
    """The auto classes (most specific first) that build a model for `config`'s type."""
    import transformers

    from compressor.io.modeling_dlnc import AUTO_CLASSES

    kind = type(config)
    return [a for a in AUTO_CLASSES if kind in getattr(transformers, a)._model_mapping]


def auto_map(config: object) -> dict[str, str]:
    """config.json's `auto_map` for a factorized export of `config`'s architecture; empty when
    the config already names remote code of its own (its classes are not transformers')."""
    if getattr(config, "auto_map", None) and not is_own(config.auto_map):
        return {}
    models = {a: f"{MODULE}.Dlnc{a.removeprefix('Auto')}" for a in _auto_classes(config)}
    return {"AutoConfig": f"{MODULE}.DlncConfig", **models} if models else {}


def auto_class_for(config: object) -> str:
    """The auto class that builds `config`'s architecture (`GPT2LMHeadModel` ->
    `AutoModelForCausalLM`); `AutoModel` if none names it."""
    import transformers

    arch = next(iter(getattr(config, "architectures", None) or ()), None)
    for name in _auto_classes(config):
        built = getattr(transformers, name)._model_mapping[type(config)]
        if getattr(built, "__name__", None) == arch:
            return name
    return "AutoModel"


def is_own(entries: dict | None) -> bool:
    """Whether an `auto_map` is the one dlnc writes (every class in `modeling_dlnc`)."""
    return bool(entries) and all(str(v).startswith(f"{MODULE}.") for v in entries.values())


def write_portable(folder: Path, config: object, data: dict) -> dict:
    """`data` (config.json of a transformers export of `config`) with its `auto_map` and
    `modeling_dlnc.py` put in `folder` when it is factorized; without factors, an `auto_map`
    dlnc wrote before (a model loaded from an export) is dropped: no file for it to name."""
    if is_own(data.get("auto_map")):
        data = {k: v for k, v in data.items() if k != "auto_map"}
    entries = auto_map(config) if (data.get("dlnc") or {}).get("layers") else {}
    if not entries:
        return data
    from compressor.io import modeling_dlnc

    shutil.copyfile(modeling_dlnc.__file__, Path(folder) / f"{MODULE}.py")
    return {**data, "auto_map": entries}
