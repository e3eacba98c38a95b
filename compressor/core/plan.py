"""What a rank method works from and what it gives: the targeted weights and their
decompositions, the measured inputs (calibration statistics, weight updates), and the `Plan`
that `compress_` and `estimate-ranks` read. Types only, shared by every method."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from compressor.core.compress import FactorFn
from compressor.core.linalg import Decomposition
from compressor.core.whitening import DEFAULT_DAMPING

__all__ = ["INPUTS", "MethodInputs", "Plan", "Weights"]

INPUTS = ("grams", "updates")
"""What a method may need besides the weights: calibration Gram matrices, weight updates."""


@dataclass(frozen=True)
class MethodInputs:
    """What was measured for the methods: calibration statistics and weight updates by layer."""

    grams: Mapping[str, object] | None = None  # layer -> whitening.LayerStats
    updates: Mapping[str, torch.Tensor] | None = None  # layer -> dW (out x in)
    damping: float = DEFAULT_DAMPING  # whitening: relative damping of the Gram matrices
    sensitivity: Mapping[str, torch.Tensor] | None = None  # layer -> output sensitivity per channel
    derived: dict = field(default_factory=dict, compare=False)  # what methods derive, once

    def once(self, key: str, make: Callable[[], object]) -> object:
        """`make()` the first time `key` is asked for, the same object afterwards: a method's
        spectra and factors share one whitening or one joint decomposition per layer."""
        if key not in self.derived:
            self.derived[key] = make()
        return self.derived[key]

    @property
    def available(self) -> frozenset[str]:
        return frozenset(n for n in INPUTS if getattr(self, n) is not None)


@dataclass(frozen=True)
class Weights:
    """The targeted weights (out x in, Linear layout) and one decomposition of each: its
    singular values and the singular vectors up to break-even (higher ranks stay dense)."""

    tensors: Mapping[str, torch.Tensor]
    decomps: Mapping[str, Decomposition]

    @property
    def spectra(self) -> dict[str, torch.Tensor]:
        return {n: d.s for n, d in self.decomps.items()}


@dataclass
class Plan:
    """What `compress_` needs for one method, plus what `estimate-ranks` reads from it."""

    method: str
    spectra: dict[str, torch.Tensor]  # drive the rank allocation
    factor_fn: FactorFn
    shapes: dict[str, tuple[int, int]]  # (out, in) of each target
    weight_spectra: dict[str, torch.Tensor]  # singular values of W
    reading: Callable[[str, float], int]  # (layer, tau) -> the rank this method reads
    gains: dict[str, torch.Tensor] | None = None  # output-aware allocation (None: by spectra)
