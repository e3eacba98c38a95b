"""Scratch files of a run: a Gram matrix's tridiagonal reduction (`core.gram.Tridiagonal`)
kept on disk between the streamed passes, its reflectors read back only when needed.

Layout (float32, native order): d (n), e (n - 1), tau (n - 1), then row j of the reflectors
from column j + 1 for j < n - 2: about half the bytes of the n x n matrix.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from compressor.core.gram import Tridiagonal

__all__ = ["load_tridiagonal", "save_tridiagonal"]


def save_tridiagonal(reduced: Tridiagonal, path: Path) -> Tridiagonal:
    """Write `reduced` to `path` and return it with the reflectors left there (read back
    when `eigen` needs them)."""
    with open(path, "wb") as f:
        for part in (reduced.d, reduced.e, reduced.tau, *_rows(reduced.reflectors())):
            f.write(memoryview(part.contiguous().numpy()))
    return Tridiagonal(reduced.d, reduced.e, reduced.tau, partial(_reflectors, path, reduced.n))


def load_tridiagonal(path: Path, n: int) -> Tridiagonal:
    """What `save_tridiagonal` wrote for an n x n matrix (the reflectors stay in the file)."""
    head = torch.from_file(str(path), size=3 * n - 2, dtype=torch.float32).clone()
    return Tridiagonal(
        head[:n], head[n : 2 * n - 1], head[2 * n - 1 :], partial(_reflectors, path, n)
    )


def _rows(matrix: torch.Tensor) -> list[torch.Tensor]:
    """The stored part of each reflector: row j from column j + 1, for j < n - 2."""
    return [matrix[j, j + 1 :] for j in range(matrix.shape[0] - 1)]


def _reflectors(path: Path, n: int) -> torch.Tensor:
    """The (n-1) x (n-1) reflector matrix, read from the file row by row straight into place."""
    matrix = torch.zeros(n - 1, n - 1)
    with open(path, "rb", buffering=0) as f:
        f.seek(4 * (3 * n - 2))
        for row in _rows(matrix):
            f.readinto(memoryview(row.numpy()).cast("B"))
    return matrix
