"""LoRA on a dlnc model with PEFT, aimed with the layer names users know.

A `FactorizedLinear` is not a layer type PEFT wraps, but its factors are plain `nn.Linear`s,
so LoRA goes on them: `q_proj` becomes `q_proj.down` and `q_proj.up` (and its inner factors,
if deepened). `merge_and_unload` then folds each adapter into its factor, and the model stays a
dlnc model of the same ranks, which `export` writes and `from_pretrained` reloads.

`lora_config(model, LoraConfig(...))` turns PEFT's usual `target_modules` (`["q_proj",
"v_proj"]`, a regex, or None: PEFT's defaults for the architecture) into those factor names;
the config it returns is a plain `LoraConfig` that `get_peft_model` takes and that
`save_pretrained` / `PeftModel.from_pretrained` keep as it is. (Registering the layer with PEFT
instead, `LoraConfig._register_custom_module`, is lost when an adapter is saved: PEFT does not
store it, so `PeftModel.from_pretrained` would fail on the same names.)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from compressor.core.layers import FactorizedLinear, layout_of
from compressor.errors import DlncError

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["lora_config", "lora_targets"]

ALL_LINEAR = "all-linear"
"""PEFT's own choice of every linear layer but the output head: it already finds the factors
(they are `nn.Linear`s), so `lora_config` leaves it as it is."""


def lora_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Full module names for `peft.LoraConfig(target_modules=...)`: for every layer whose name
    is or ends with one of `names`, its factors when it is factorized, itself when it is a
    dense `nn.Linear` (or transformers' `Conv1D`, GPT-2's)."""
    wanted = tuple(names)
    found: list[str] = []
    for name, module in model.named_modules():
        if not any(name == w or name.endswith(f".{w}") for w in wanted):
            continue
        if isinstance(module, FactorizedLinear):
            found += [f"{name}.{child}" for child, m in module.named_modules() if _is_linear(m)]
        elif _is_linear(module) or layout_of(module) == "conv1d":
            found.append(name)
    if not found:
        raise DlncError(f"`names` {list(wanted)}: no linear or factorized layer has these names")
    return found


def lora_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` with its `target_modules` aimed at `model`'s factors (`lora_targets`): a list
    of names as PEFT matches them (a name or its last parts), a regex (PEFT matches it against
    whole module names), or None for PEFT's default targets of the model's architecture;
    "all-linear" is kept. The rest of `config` is unchanged."""
    targets = config.target_modules
    if targets == ALL_LINEAR:
        return config
    if targets is None:
        names = _default_targets(model)
    elif isinstance(targets, str):
        names = [n for n, _ in model.named_modules() if n and re.fullmatch(targets, n)]
        if not names:
            raise DlncError(f"`target_modules` {targets!r}: no module name matches it")
    else:
        names = list(targets)
    return dataclasses.replace(config, target_modules=lora_targets(model, names))


def _default_targets(model: nn.Module) -> list[str]:
    """PEFT's default LoRA targets for the model's architecture (`q_proj`, `v_proj` for Llama)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULTS:
        raise DlncError(
            f"PEFT has no default `target_modules` for model type {kind!r}; name the layers"
        )
    return list(DEFAULTS[kind])


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)
