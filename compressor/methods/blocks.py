"""Block-by-block calibration: run data through a model one decoder/encoder block at a time.

The model's module tree lives on the meta device; `stream_blocks` materializes the modules
outside the block stack (embeddings, rotary tables, ...) once, catches the inputs of the first
block, then for each block in turn: loads its weights, yields it with its inputs, runs it on
those inputs to make the next block's inputs, and sends it back to the meta device. Memory:
one block's weights plus the activations of the calibration batches (kept on disk with
`spill_dir`), never the model.

The consumer may change the block while it holds it (e.g. compress it in place): the next
block's inputs come from the block as it is when control returns to the loop, so
error-correcting calibration (statistics of block i from the inputs the already-compressed
blocks 0..i-1 produce) is the same loop.

    for block in stream_blocks(model, batches, load):
        stats.update(block_grams(block, targets))

`walk_blocks` is the loop itself, in a folder the caller owns; with `keep` every block's inputs
and outputs stay (`Block.hidden`, `Block.output`) for a pass that goes back through the blocks
(the output sensitivity's backward pass, `pipelines.sensitivity`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache

from compressor.core.progress import ProgressFn
from compressor.core.tasks import model_inputs
from compressor.core.whitening import LayerStats
from compressor.errors import DlncError
from compressor.methods.calibration import GramCollector

__all__ = [
    "Activations",
    "Block",
    "LoadFn",
    "block_grams",
    "find_blocks",
    "first_inputs",
    "outside_modules",
    "real_mask",
    "stream_blocks",
    "walk_blocks",
]

LoadFn = Callable[[str, nn.Module], None]
"""load(prefix, module): give the meta `module` (at dotted `prefix`) and its children their
real weights (`compressor.io.streaming.module_loader` reads them from a checkpoint)."""


class _Caught(Exception):
    """Raised by the first block's stand-in once it has its inputs."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the `nn.ModuleList` of same-class modules that
    holds the most parameters (Llama's `model.layers`, BERT's `encoder.layer`, GPT-2's `h`)."""
    best, size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        n = sum(p.numel() for p in module.parameters())
        if n > size:
            best, size = (name, module), n
    if best is None:
        raise DlncError("no stack of repeated blocks in this model: calibrate it in memory")
    return best


@dataclass
class Activations:
    """The hidden states entering a block, one tensor per batch: in memory until they take
    more than `spill_over` bytes, then all on disk under `spill_dir` (None: never)."""

    spill_dir: Path | None = None
    spill_over: int = 0
    _memory: dict[int, torch.Tensor] = field(default_factory=dict)
    _on_disk: set[int] = field(default_factory=set)

    def put(self, i: int, x: torch.Tensor) -> None:
        if self.spill_dir is not None and not self._on_disk:
            held = sum(t.nbytes for t in self._memory.values())
            if held + x.nbytes > self.spill_over:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                for j in list(self._memory):
                    self._save(j, self._memory.pop(j))
        if self._on_disk:
            self._save(i, x)
        else:
            self._memory[i] = x

    def get(self, i: int) -> torch.Tensor:
        if i not in self._on_disk:
            return self._memory[i]
        return torch.load(self.spill_dir / f"{i}.pt", mmap=True, weights_only=True)

    def sibling(self, name: str) -> Activations:
        """An empty set that spills beside this one, under the same threshold."""
        folder = self.spill_dir.parent / name if self.spill_dir is not None else None
        return Activations(folder, self.spill_over)

    def discard(self) -> None:
        """Drop them (their files too): the next block's inputs replace them."""
        self._memory.clear()
        if self._on_disk:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self._on_disk.clear()

    def _save(self, i: int, x: torch.Tensor) -> None:
        torch.save(x, self.spill_dir / f"{i}.pt")
        self._on_disk.add(i)


@dataclass
class Block:
    """One block of the stack, its weights loaded, and what enters it for each batch."""

    index: int
    name: str  # full dotted name, e.g. "model.layers.3"
    module: nn.Module
    hidden: Activations  # the hidden states entering the block, per batch
    extras: list[tuple[tuple, dict]]  # the other positional / keyword arguments, per batch
    masks: list[torch.Tensor | None]  # the batches' attention masks (padding is not counted)
    output: Activations | None = None  # what it handed the next block, once the loop ran it
    returns_tuple: bool = False  # the module returns a tuple (hidden states first)

    def __len__(self) -> int:
        return len(self.extras)

    def run(self, i: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output hidden states for batch `i` (from `hidden` instead of what
        entered it, when given)."""
        args, kwargs = self.extras[i]
        out = self.module(self.hidden.get(i) if hidden is None else hidden, *args, **kwargs)
        self.returns_tuple = isinstance(out, tuple)
        return out[0] if isinstance(out, tuple) else out

    def outputs(self, out: Activations) -> Activations:
        """What the block (as it is now) hands the next one, for every batch (into `out`)."""
        for i in range(len(self)):
            out.put(i, self.run(i))
        return out


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    load: LoadFn,
    spill_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    spill_over: int = 0,
) -> Iterator[Block]:
    """Yield each block of `model` (a meta-device module tree) with its inputs, one at a time
    (see the module docstring). `load(prefix, module)` materializes weights. With `spill_dir`,
    a block's activations that take more than `spill_over` bytes go to disk there (0: all),
    one block's at a time."""
    with tempfile.TemporaryDirectory(prefix="dlnc-acts-", dir=spill_dir) as tmp:
        spill = Path(tmp) if spill_dir is not None else None
        room = Activations(spill / "in" if spill else None, spill_over)
        yield from walk_blocks(model, batches, load, room, progress)


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    load: LoadFn,
    room: Activations,
    progress: ProgressFn | None = None,
    keep: bool = False,
) -> Iterator[Block]:
    """`stream_blocks` with the first block's inputs put in `room` (each block's outputs
    spill beside them). `keep`: every block's inputs and outputs are kept (`Block.hidden`,
    `Block.output`) for the caller to discard, not only the current block's."""
    stack_name, stack = find_blocks(model)
    batches = list(batches)
    _load_outside(model, stack_name, load)
    hidden, extras = first_inputs(model, stack, batches, room)
    masks = [real_mask(b) for b in batches]
    for index, module in enumerate(stack):
        name = f"{stack_name}.{index}"
        load(name, module)
        block = Block(index, name, module.eval(), hidden, extras, masks)
        yield block
        hidden = block.output = block.outputs(hidden.sibling(str(index)))
        if not keep:
            block.hidden.discard()
        block.module.to("meta")  # release its weights
        if progress:
            progress("blocks", index + 1, len(stack))


def real_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's real (non-padding) tokens as a bool mask, or None without a mask."""
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else None


def _load_outside(model: nn.Module, stack_name: str, load: LoadFn) -> None:
    """Load the modules outside the block stack when they first run: the embeddings are
    loaded, the final norm and the LM head, never reached before the first block, are not."""
    for name, module in outside_modules(model, stack_name):
        module.register_forward_pre_hook(_load_once(name, load))


def outside_modules(model: nn.Module, stack_name: str) -> Iterator[tuple[str, nn.Module]]:
    """The modules outside the block stack `stack_name` with weights still on the meta device
    (their own, not their children's)."""
    for name, module in model.named_modules():
        if name == stack_name or name.startswith(stack_name + "."):
            continue
        if any(p.is_meta for p in module.parameters(recurse=False)):
            yield name, module


def _load_once(name: str, load: LoadFn):
    def pre_hook(module: nn.Module, args: tuple) -> None:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            load(name, module)

    return pre_hook


def first_inputs(model: nn.Module, stack: nn.ModuleList, batches, hidden: Activations):
    """Run the model up to its first block for every batch and keep what enters it in
    `hidden`; returns it with the block's other arguments per batch."""
    first = stack[0]
    extras = []

    def catch(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.put(len(extras), x)
        # no cache (GPT-2 passes it positionally): each run of a block is one full pass
        args = tuple(None if isinstance(a, Cache) else a for a in args[1:])
        kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
        extras.append((args, kwargs))
        raise _Caught

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**model_inputs(batch, model))
            except _Caught:
                continue
            raise DlncError("the model never reached its first block on the data")
    finally:
        handle.remove()
    return hidden, extras


@torch.no_grad()
def block_grams(
    block: Block, targets: Mapping[str, nn.Module], single_from: int | None = None
) -> dict[str, LayerStats]:
    """The input Gram of each target inside `block` (full names), exactly as `collect_grams`
    counts them: padding left out, one shared matrix for layers fed the same tensor; float64,
    or float32 for inputs at least `single_from` wide (half the memory: Llama-7B's FFN output
    projection's is 0.97 GB in float64)."""
    inside = {n: m for n, m in targets.items() if n.startswith(block.name + ".")}
    collector = GramCollector(inside, single_from)
    with collector.hooked():
        for i in range(len(block)):
            collector.batch(block.masks[i])
            block.run(i)
    return collector.result()
