"""Several processes (torchrun / accelerate launch) split the layers between them: each takes
every n-th layer's spectrum, then its factors, into a parts folder beside the output; the main
process writes the export from there. One process: nothing of this runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.pipelines.source import LayerSpec, StreamedCheckpoint
from compressor.pipelines.writer import FactorOf

__all__ = ["mine", "parts_dir", "shared_factors", "shared_spectra", "world"]


def world():
    """accelerate's process state under torchrun / accelerate launch (several processes split
    the layers between them); None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from compressor.training.evaluate import cpu_launch

    return PartialState(cpu=cpu_launch())


def mine(names: list[str], state) -> list[str]:
    """The layers one of several processes decomposes: every n-th."""
    return names[state.process_index :: state.num_processes]


def shared_spectra(
    names: list[str], spectra: Callable[[list[str]], dict[str, torch.Tensor]], state
) -> dict[str, torch.Tensor]:
    """1) `spectra(names)`; with several processes each takes its share, then all gather."""
    if state is None:
        return spectra(names)
    from accelerate.utils import gather_object

    parts = gather_object([spectra(mine(names, state))])
    merged = {k: v for part in parts for k, v in part.items()}
    return {n: merged[n] for n in names}


def parts_dir(out: Path) -> Path:
    out = Path(out).resolve()
    return out.parent / f".{out.name}.parts"


def shared_factors(
    ckpt: StreamedCheckpoint, layers: dict[str, LayerSpec], factor: FactorOf, out: Path, state
) -> FactorOf:
    """2) with several processes: each factorizes its share of the layers (those whose pass
    1 it ran: their reductions) into a parts folder beside the output; the main process's
    writer then reads the factors from there."""
    parts = parts_dir(out)
    if state.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    state.wait_for_everyone()
    for name in mine(list(layers), state):
        t = layers[name]
        if t.decision.dense:
            continue
        up, down, rel = factor(name, ckpt.reader(name, t, checked=False), t.decision.rank)
        tensors = {"up": up.contiguous(), "down": down.contiguous()}
        save_file(tensors, parts / f"{name}.safetensors", metadata={"rel": repr(rel)})
    state.wait_for_everyone()

    def read(name: str, weight, rank: int):
        with safe_open(parts / f"{name}.safetensors", framework="pt") as h:
            return h.get_tensor("up"), h.get_tensor("down"), float(h.metadata()["rel"])

    return read
