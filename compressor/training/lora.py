"""LoRA on a dlnc model with PEFT, aimed with the layer names users know.

A `FactorizedLinear` is not a layer type PEFT wraps, but its factors are plain `nn.Linear`s,
so LoRA goes on them: `q_proj` becomes `q_proj.down` and `q_proj.up` (and its inner factors,
if deepened). `merge_and_unload` then folds each adapter into its factor, and the model stays a
dlnc model of the same ranks, which `export` writes and `from_pretrained` reloads.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from compressor.core.layers import FactorizedLinear
from compressor.errors import DlncError

__all__ = ["lora_targets"]


def lora_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Full module names for `peft.LoraConfig(target_modules=...)`: for every layer whose name
    is or ends with one of `names`, its factors when it is factorized, itself when it is a
    dense `nn.Linear`."""
    wanted = tuple(names)
    found: list[str] = []
    for name, module in model.named_modules():
        if not any(name == w or name.endswith(f".{w}") for w in wanted):
            continue
        if isinstance(module, FactorizedLinear):
            found += [f"{name}.{child}" for child, m in module.named_modules() if _is_linear(m)]
        elif isinstance(module, nn.Linear):
            found.append(name)
    if not found:
        raise DlncError(f"`names` {list(wanted)}: no linear or factorized layer has these names")
    return found


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)
