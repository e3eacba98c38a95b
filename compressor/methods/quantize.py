"""Quantizing a model's layers block by block on calibration data (GPTQ's sequential order):
each block's input Grams are counted on the hidden states the already-quantized blocks before
it produce, so every layer is rounded for the inputs it will see; its block is then run again,
quantized, to make the next block's inputs. Layers outside the block stack (or a model without
one) are quantized last, on Grams of the whole quantized model. The rounding itself is
`compressor.core.surgery.quantize_` (GPTQ, a chain's down factor first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from compressor.core.progress import ProgressFn
from compressor.core.quantize import QuantSpec
from compressor.core.surgery import quantize_
from compressor.errors import DlncError
from compressor.methods.blocks import (
    Activations,
    Block,
    block_grams,
    find_blocks,
    first_inputs,
    real_mask,
)
from compressor.methods.calibration import collect_grams

__all__ = ["quantize_blocks"]


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    names: Sequence[str],
    spec: QuantSpec,
    batches: Iterable[Mapping[str, torch.Tensor]],
    progress: ProgressFn | None = None,
) -> None:
    """In place: the layers `names` of `model` quantized by `spec` with GPTQ, block by block on
    `batches` (module docstring)."""
    batches = list(batches)
    was = model.training
    model.eval()
    try:
        left = _in_blocks(model, list(names), spec, batches, progress)
        if left:
            targets = {n: model.get_submodule(n) for n in left}
            stats = collect_grams(model, targets, batches)
            quantize_(model, left, spec, {n: s.gram for n, s in stats.items()})
    finally:
        model.train(was)


def _in_blocks(model, names: list[str], spec: QuantSpec, batches, progress) -> list[str]:
    """Quantize the layers inside the block stack; the names left (outside it, or all when
    the model has no stack)."""
    try:
        stack_name, stack = find_blocks(model)
    except DlncError:
        return names
    inside = [n for n in names if n.startswith(stack_name + ".")]
    if not inside:
        return names
    hidden, extras = first_inputs(model, stack, batches, Activations())
    masks = [real_mask(b) for b in batches]
    last = max(int(n[len(stack_name) + 1 :].split(".")[0]) for n in inside)
    for index, module in enumerate(stack[: last + 1]):
        prefix = f"{stack_name}.{index}."
        block = Block(index, prefix[:-1], module, hidden, extras, masks)
        layers = {n: model.get_submodule(n) for n in inside if n.startswith(prefix)}
        if layers:
            stats = block_grams(block, layers)
            quantize_(model, list(layers), spec, {n: s.gram for n, s in stats.items()})
        if index < last:
            hidden = block.outputs(Activations())
        if progress:
            progress("quantize", index + 1, last + 1)
    return [n for n in names if n not in inside]
