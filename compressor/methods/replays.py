"""Runs of a compressed block in which the layers already settled play back their outputs
(error-correcting calibration's runs, `methods.sequential`): the numbers of full runs at
about half their cost."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from compressor.core.surgery import module_hooks, swapped
from compressor.methods.blocks import Activations, Block
from compressor.methods.calibration import real_rows

__all__ = ["REPLAY_BYTES", "Replays"]


class Stop(Exception):
    """Raised by a hook to end a forward pass once the layer it waits for has its input."""


REPLAY_BYTES = 1 << 30
"""What one block's `Replays` may hold: past it, the later layers' outputs are recomputed."""


class Replays:
    """Runs of the compressed `block` in which the layers already settled (refit, or kept
    without a refit) play back their outputs instead of computing them: a layer's output no
    longer changes once its factors and everything before it in the block are final, so each
    run computes only what changed since the last (about half of the correction's forward
    work on a Llama block). A settled layer's outputs are caught on the next round of runs (one
    over every batch that passes it), in memory up to `REPLAY_BYTES` per block; the tensors
    played back are the ones it computed, so every number is a full run's."""

    def __init__(self, model: nn.Module, block: Block) -> None:
        self.model, self.block = model, block
        self.played: dict[str, dict[int, torch.Tensor]] = {}  # layer -> batch -> its output
        self.caught: dict[str, dict[int, torch.Tensor]] = {}  # caught on this round of runs
        self.waiting: list[str] = []  # settled: to be caught on the next round
        self.bytes = 0

    def settled(self, names: Iterable[str]) -> None:
        """These layers' factors are final: catch their outputs on the next round of runs."""
        self.waiting.extend(names)

    def input_of(self, name: str, i: int) -> torch.Tensor:
        """The input (real tokens x features, float32) of layer `name` when the block runs
        batch i (the run stops there)."""
        got: dict[str, torch.Tensor] = {}

        def pre(module, args):
            got["x"] = args[0]
            raise Stop

        handle = self.model.get_submodule(name).register_forward_pre_hook(pre)
        try:
            self._run(i)
        except Stop:
            pass
        finally:
            handle.remove()
        x = real_rows(got["x"], self.block.masks[i])
        return x.reshape(-1, x.shape[-1]).float()

    def outputs(self, out: Activations) -> Activations:
        """What the block (as it is now) hands the next one, for every batch (into `out`)."""
        for i in range(len(self.block)):
            out.put(i, self._run(i))
        return out

    def discard(self) -> None:
        self.played, self.caught, self.bytes = {}, {}, 0

    def _run(self, i: int) -> torch.Tensor:
        if i == 0:  # a new round: the layers settled since the last one are caught on it
            self.caught = {n: {} for n in self.waiting}
            self.waiting = []
        stand_ins = {n: PlayBack(outputs[i]) for n, outputs in self.played.items()}
        caught = {n: self.model.get_submodule(n) for n in self.caught}
        try:
            with swapped(self.model, stand_ins), module_hooks(caught, self._catcher(i)):
                return self.block.run(i)
        finally:  # (also when `input_of` stops the run)
            if i == len(self.block) - 1:  # the round is over: what it caught whole plays back
                whole = {n: o for n, o in self.caught.items() if len(o) == len(self.block)}
                self.played.update(whole)
                self.caught = {}

    def _catcher(self, i: int):
        def catcher(name: str):
            def hook(module, args, output):
                outputs = self.caught.get(name)
                if outputs is None:
                    return
                room = torch.is_tensor(output) and self.bytes + output.nbytes <= REPLAY_BYTES
                if i in outputs or not room:  # called twice, or no room: it is recomputed
                    del self.caught[name]
                    return
                self.bytes += output.nbytes
                outputs[i] = output

            return hook

        return catcher


class PlayBack(nn.Module):
    """Stands in for a settled layer: gives back (a copy of) its output on this batch."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.clone()
