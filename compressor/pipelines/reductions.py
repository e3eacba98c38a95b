"""Pass 1's tridiagonal reductions of the large layers' Gram matrices, kept on disk for pass 2
(`core.solver.KeptReductions`): a third of a large layer's time on a CPU."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from compressor.core.gram import gram_singular_values, gram_tridiagonal, resolve_device
from compressor.core.solver import Read, Solver
from compressor.io.scratch import load_tridiagonal, save_tridiagonal

__all__ = ["Reductions", "keep_reductions"]


class Reductions:
    """Pass 1's tridiagonal reductions of the large layers' Gram matrices (`Tridiagonal`),
    kept on disk for pass 2. Kept for the `auto` solver on a CPU (on a GPU recomputing is
    cheaper than the disk), when the disk beside the output has room for them (half a
    float32 Gram matrix each) and the export."""

    def __init__(self, folder: Path | None = None, sizes: dict[str, int] | None = None) -> None:
        self.folder, self.sizes = folder, sizes or {}

    def spectrum(self, name: str, read: Read, device) -> torch.Tensor:
        """Pass 1: the layer's singular values, its reduction saved when kept."""
        if self.folder is None or name not in self.sizes:
            return gram_singular_values(read, device)
        reduced, _ = gram_tridiagonal(read)
        values = reduced.eigenvalues()
        save_tridiagonal(reduced, self._path(name))
        return values.clamp_min(0).sqrt()

    def basis(self, name: str, rank: int) -> torch.Tensor | None:
        """Pass 2: the top `rank` singular vectors of the layer's smaller side, or None if
        its reduction was not kept (here: another process's layer)."""
        path = self._path(name) if self.folder is not None else None
        if path is None or not path.exists():
            return None
        return load_tridiagonal(path, self.sizes[name]).eigen(rank)[1]

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.tridiagonal"


def keep_reductions(
    solver: Solver, shapes: Mapping[str, tuple[int, int]], folder: Path, budget: int
) -> str | None:
    """Keep pass 1's reductions of the large layers in `folder` when it is the `auto` solver
    on a CPU and the disk has room for them beside `budget` bytes (the export); returns a
    notice when they would not fit, else None."""
    if solver.solver != "auto" or resolve_device(solver.device).type != "cpu":
        return None
    sizes = {n: min(s) for n, s in shapes.items() if solver.large(s)}
    need = sum(4 * (n * n // 2 + 3 * n) for n in sizes.values())
    free = shutil.disk_usage(folder).free
    if need + budget > free:
        return (
            f"{need / 1e9:.1f} GB of Gram reductions would not fit on the disk beside "
            f"the output with the export ({free / 1e9:.1f} GB free): each Gram matrix "
            "is formed and reduced twice (about 1.5x the time)"
        )
    solver.kept = Reductions(folder, sizes)
    return None
