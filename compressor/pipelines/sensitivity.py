"""Output sensitivity block by block: `methods.sensitivity.output_sensitivity`'s numbers for a
model whose tree is on the meta device, with at most one block's weights loaded at a time (and
the modules outside the block stack: embeddings, final norm, head).

1. Forward: the blocks in turn (`methods.blocks.walk_blocks`), every block's input hidden
   states kept (on disk past `spill_over` bytes each).
2. The tail: the model runs on each batch with its blocks stood in for (the first hands on the
   last block's output, a leaf; the others pass it through), so what follows the stack (final
   norm, head or its `head_probe` stand-in, the main output) runs as the whole model runs it;
   the same seeded probes, drawn in the same order as `output_sensitivity`, are
   backpropagated to that leaf.
3. Backward, last block first: the block is loaded, its forward recomputed with grad from the
   input kept, the gradient that reached its output backpropagated (the targets' output
   gradients caught by the same hooks as in memory, batch by batch and probe by probe, so
   every sum is added up in the same order), and the gradient at its input handed to the block
   before it; then its weights are released.
The gradients are the in-memory ones bit for bit: the same kernels run on the same values, a
block's input gradient is summed over its uses in the same order whether the input is a leaf
or the previous block's output. Cost: two forward passes and one backward pass per batch and
probe; memory: one block's weights and its graph for one batch, plus the kept activations.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compressor.core.progress import ProgressFn
from compressor.core.tasks import model_inputs
from compressor.io.streaming import module_loader
from compressor.methods.blocks import (
    Activations,
    Block,
    LoadFn,
    find_blocks,
    outside_modules,
    walk_blocks,
)
from compressor.methods.sensitivity import (
    SENSITIVITY_TOKENS,
    ChannelSquares,
    head_probe,
    main_output,
    probe,
    probed_batches,
    with_grads,
)
from compressor.pipelines.source import LayerSpec, NotStreamable, StreamedCheckpoint, release

__all__ = ["blockwise_sensitivity", "sensitivity_pass"]


def sensitivity_pass(
    ckpt: StreamedCheckpoint,
    layers: dict[str, LayerSpec],
    data,
    tmp: Path,
    spill_over: int,
    progress: ProgressFn | None,
) -> dict[str, torch.Tensor]:
    """Each target's per-channel output sensitivity, read block by block from the checkpoint
    (`blockwise_sensitivity`), as the in-memory plan measures it. Raises `NotStreamable` when
    a target sits outside the block stack."""
    model = ckpt.loaded.model
    stack_name, _ = find_blocks(model)
    outside = [n for n in layers if not n.startswith(stack_name + ".")]
    if outside:
        raise NotStreamable(f"{outside[0]} is outside the model's block stack")
    targets = {n: model.get_submodule(n) for n in layers}
    load = module_loader(ckpt.tensors, ckpt.keys)
    try:
        return blockwise_sensitivity(
            model, targets, data, load, spill_dir=tmp, spill_over=spill_over, progress=progress
        )
    finally:
        release(model)


def blockwise_sensitivity(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    load: LoadFn,
    probes: int = 1,
    seed: int = 0,
    spill_dir: str | Path | None = None,
    spill_over: int = 0,
    progress: ProgressFn | None = None,
    tokens: int | None = SENSITIVITY_TOKENS,
) -> dict[str, torch.Tensor]:
    """`output_sensitivity(model, targets, batches, probes, seed, tokens=tokens)` of a
    meta-device `model` whose weights `load(prefix, module)` gives, one block at a time
    (module docstring), over the same probed batches. With `spill_dir`, each block's
    activations past `spill_over` bytes go to disk there. Loaded weights are left for the
    caller to release."""
    batches = list(batches)
    batches = batches[: probed_batches(batches, tokens)]
    squares = ChannelSquares(targets)
    blocks = len(find_blocks(model)[1])
    steps = 2 * blocks + 1

    def counted(stage: str, i: int, n: int) -> None:
        progress("sensitivity", i, steps)

    with tempfile.TemporaryDirectory(prefix="dlnc-sens-", dir=spill_dir) as tmp:
        spill = Path(tmp) if spill_dir is not None else None
        room = Activations(spill / "in" if spill else None, spill_over)
        walked = list(walk_blocks(model, batches, load, room, counted if progress else None, True))
        with squares.hooked(), with_grads(model):
            grads = _tail(model, walked[-1], batches, probes, seed, squares, load)
            if progress:
                progress("sensitivity", blocks + 1, steps)
            for block in reversed(walked):
                grads = _backward(block, grads, probes, squares, load)
                if progress:
                    progress("sensitivity", steps - block.index, steps)
            grads.discard()
    return squares.result()


def _tail(model: nn.Module, last: Block, batches, probes, seed, squares, load) -> Activations:
    """The gradient of <r, f> at the last block's output, per batch and probe (batch-major):
    the model run with its blocks stood in for, its last block's output given, and r the
    probes `output_sensitivity` draws."""
    stack_name, stack = find_blocks(model)
    for name, module in list(outside_modules(model, stack_name)):  # the head, final norm...
        load(name, module)
    if hasattr(model, "tie_weights"):  # a head tied to the embeddings: their loaded tensor
        model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    grads = last.output.sibling("grad-tail")
    given: list[torch.Tensor] = []
    with _stood_in(stack, given, last.returns_tuple), head_probe(model):
        for b, batch in enumerate(batches):
            inputs = model_inputs(batch, model)
            squares.mask = last.masks[b]
            for p in range(probes):
                given[:] = [last.output.get(b).detach().requires_grad_(True)]
                with torch.enable_grad():
                    out = main_output(model(**inputs))
                    (out * probe(out, generator, squares.mask)).sum().backward()
                grads.put(b * probes + p, given[0].grad)
    last.output.discard()
    return grads


def _backward(block: Block, grads: Activations, probes: int, squares, load: LoadFn):
    """Backpropagate `grads` (at the block's output, per batch and probe) through `block`,
    recomputed from its kept inputs; returns the gradients at its input."""
    load(block.name, block.module)
    into = grads.sibling(f"grad-{block.index}")
    for b in range(len(block)):
        squares.mask = block.masks[b]
        for p in range(probes):
            x = block.hidden.get(b).detach().requires_grad_(True)
            with torch.enable_grad():
                block.run(b, x).backward(grads.get(b * probes + p))
            into.put(b * probes + p, x.grad)
    grads.discard()
    block.hidden.discard()
    block.module.zero_grad(set_to_none=True)
    block.module.to("meta")  # release its weights
    return into


@contextmanager
def _stood_in(stack: nn.ModuleList, given: list[torch.Tensor], returns_tuple: bool) -> Iterator:
    """Meanwhile the blocks of `stack` do not run: the first returns `given[0]`, the others
    what they receive (in a 1-tuple when the real blocks return tuples)."""

    def stand_in(index: int):
        def forward(*args, **kwargs):
            hidden = given[0] if index == 0 else (args[0] if args else kwargs["hidden_states"])
            return (hidden,) if returns_tuple else hidden

        return forward

    for index, module in enumerate(stack):
        module.forward = stand_in(index)
    try:
        yield
    finally:
        for module in stack:
            del module.forward
