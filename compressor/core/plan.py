"""What a rank method works from and what it gives: the targeted weights (read where they are,
decomposed through one solver), the measured inputs (calibration statistics, weight updates),
and the `Plan` that `compress_` and `estimate-ranks` read. Shared by every method."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from compressor.core.compress import FactorFn
from compressor.core.solver import Factors, Read, Solver
from compressor.core.whitening import DEFAULT_DAMPING

__all__ = ["INPUTS", "Lazy", "MethodInputs", "Plan", "Weights"]

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


class Weights:
    """The targeted weights (out x in, Linear layout), read where they are (a model in memory,
    or a checkpoint tensor by tensor: `readers`), and their singular values and truncated-SVD
    factors through one `Solver`, so a method works the same in memory and streamed.

    `tensors[name]` reads the weight (checked for NaN/Inf) each time it is asked for: a
    method holds one layer at a time if it iterates. `spectra` are computed once each, when
    first asked for."""

    def __init__(self, readers: Mapping[str, Read], solver: Solver | None = None) -> None:
        self.readers = dict(readers)
        self.solver = solver or Solver()
        self.known: dict[str, torch.Tensor] = {}

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return _Read(self.readers)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(r.shape) for n, r in self.readers.items()}

    @property
    def spectra(self) -> Mapping[str, torch.Tensor]:
        """Each weight's singular values (computed when first read)."""
        return Lazy(self.readers, self.spectrum)

    def spectrum(self, name: str) -> torch.Tensor:
        if name not in self.known:
            self.known[name] = self.solver.spectrum(name, self.readers[name])
        return self.known[name]

    def factors(self, name: str, rank: int) -> Factors:
        """(up, down, relative error) of the truncated SVD at `rank`."""
        read = self.readers[name]
        unchecked = read.unchecked() if hasattr(read, "unchecked") else read
        return self.solver.factors(name, unchecked, rank, self.spectrum(name))

    def subset(self, names: Iterable[str]) -> Weights:
        """The same weights, only `names` (sharing what was computed)."""
        part = Weights({n: self.readers[n] for n in names}, self.solver)
        part.known = self.known
        return part


class _Read(Mapping[str, torch.Tensor]):
    def __init__(self, readers: Mapping[str, Read]) -> None:
        self.readers = readers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


class Lazy(Mapping[str, torch.Tensor]):
    """name -> `compute(name)`, each computed when first read and kept: spectra that only
    some readers need (`Weights.spectra`; the whiten method's, which output-aware ranks
    under `keep` never read)."""

    def __init__(self, names: Iterable[str], compute: Callable[[str], torch.Tensor]) -> None:
        self.names, self.compute = list(names), compute
        self.known: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.known:
            if name not in self.names:
                raise KeyError(name)
            self.known[name] = self.compute(name)
        return self.known[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Plan:
    """What `compress_` needs for one method, plus what `estimate-ranks` reads from it."""

    method: str
    spectra: Mapping[str, torch.Tensor]  # drive the rank allocation
    factor_fn: FactorFn
    shapes: dict[str, tuple[int, int]]  # (out, in) of each target
    weight_spectra: dict[str, torch.Tensor]  # singular values of W
    reading: Callable[[str, float], int]  # (layer, tau) -> the rank this method reads
    gains: dict[str, torch.Tensor] | None = None  # output-aware allocation (None: by spectra)
