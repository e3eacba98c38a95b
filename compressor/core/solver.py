"""One solver for every path: the singular values and truncated-SVD factors of one weight,
however it arrives (a function reading a checkpoint tensor, or a module's weight in memory).

`auto` (the default): small layers exactly (the full SVD); large ones (smaller side at least
`large_from`) from the float32 Gram matrix, or a randomized SVD when the rank is well below the
layer's size, each held to the optimum within `RANDOMIZED_TOL` (else the exact factors). A
`KeptReductions` (the executors keep them on disk) lets pass 2 take its singular vectors from
pass 1's Gram reduction instead of forming and reducing the Gram matrix again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from compressor.core.gram import (
    RANDOMIZED_MIN_SIZE,
    RANDOMIZED_TOL,
    gram_factors,
    gram_singular_values,
    randomized_factors,
    use_randomized,
)
from compressor.core.linalg import decompose, factors_from, truncation_error
from compressor.errors import DlncError

__all__ = ["SOLVERS", "Factors", "KeptReductions", "Read", "Solver"]

SOLVERS = ("auto", "exact", "randomized")
"""auto: on large layers the cheaper of a randomized SVD (ranks well below the layer's size)
and the float32 Gram route, held to the optimum; exact on small layers or when they miss it."""

Factors = tuple[torch.Tensor, torch.Tensor, float]
"""(up, down, relative error) of one layer."""

Read = Callable[[], torch.Tensor]
"""A weight reader: called, it gives the weight (Linear layout); it has a `shape`, and may
give it piece by piece (`row_blocks`, `column_blocks`) and `unchecked()` (no NaN/Inf check)."""


class KeptReductions(Protocol):
    """Pass 1's Gram reductions of large layers, kept for pass 2."""

    def spectrum(self, name: str, read: Read, device) -> torch.Tensor: ...

    def basis(self, name: str, rank: int) -> torch.Tensor | None: ...


@dataclass
class Solver:
    """How weights are decomposed (`solver`: auto, exact or randomized; `device`: where the
    linear algebra runs, None: a GPU if there is one; `large_from`: the smaller side from
    which a layer is large), with the Gram reductions pass 1 keeps for pass 2."""

    solver: str = "auto"
    device: str | None = None
    large_from: int = RANDOMIZED_MIN_SIZE
    kept: KeptReductions | None = None  # pass 1's Gram reductions, for pass 2 (None: none)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise DlncError(f"`solver` must be auto, exact or randomized, got {self.solver!r}")
        if self.large_from < 1:
            raise DlncError(f"`large_from` must be >= 1, got {self.large_from}")

    def large(self, shape: tuple[int, ...]) -> bool:
        """A layer (or Gram matrix) the `auto` solver takes the float32 way."""
        return self.solver == "auto" and min(shape) >= self.large_from

    def spectrum(self, name: str, read: Read) -> torch.Tensor:
        """The singular values of the weight `read` gives: exact (the in-memory
        decomposition) on small layers or with `solver="exact"`, else from the float32 Gram
        matrix, whose reduction may be kept. NaN/Inf shows on the Gram matrix's diagonal:
        the pieces go unchecked, and a failure reads the weight again for the error."""
        if self.solver == "exact" or min(read.shape) < self.large_from:
            return decompose(read(), 1).s
        try:
            unchecked = read.unchecked() if hasattr(read, "unchecked") else read
            if self.kept is None:
                return gram_singular_values(unchecked, self.device)
            return self.kept.spectrum(name, unchecked, self.device)
        except ValueError:
            read()  # the NaN/Inf error, naming the layer
            raise DlncError(f"{name}: weights too large for a float32 Gram matrix; "
                            "use the exact solver") from None  # fmt: skip

    def factors(self, name: str, read: Read, rank: int, s: torch.Tensor) -> Factors:
        """(up, down, relative error) at `rank` (`s`: the spectrum pass 1 gave). `auto` on a
        large layer: from pass 1's kept basis, else the cheaper of the randomized SVD and
        the float32 Gram route, kept if it reaches the optimum within `RANDOMIZED_TOL`;
        else (and with `solver="exact"`) the exact factors."""
        fast = self._fast(name, read, rank)
        if fast is not None:
            total = float(s.double().square().sum())  # ||W||_F^2: no need to read it again
            up, down, top = fast()
            error = max(total - float(top.double().square().sum()), 0.0) ** 0.5
            optimum = truncation_error(s, rank)
            if self.solver == "randomized" or error <= (1 + RANDOMIZED_TOL) * optimum:
                return up, down, error / max(total**0.5, 1e-30)
        weight = read()
        d = decompose(weight, rank)
        up, down = factors_from(weight, d, rank)
        return up, down, truncation_error(d.s, rank) / max(float(d.s.norm()), 1e-30)

    def _fast(self, name: str, read: Read, rank: int):
        device = self.device
        kept = self.kept if self.solver == "auto" else None
        basis = kept.basis(name, rank) if kept is not None else None
        if basis is not None:
            return lambda: gram_factors(read, rank, device=device, basis=basis)
        if self.solver == "randomized" or (
            self.solver == "auto" and use_randomized(read.shape, rank)
        ):
            return lambda: randomized_factors(read(), rank, device=device)
        if self.large(read.shape):
            return lambda: gram_factors(read, rank, device=device)
        return None
