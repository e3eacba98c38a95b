"""How fast a linear layer runs dense and factorized on a device: its speed break-even.

A factorized layer does rank * (in + out) multiply-adds per row against in * out for the dense
one, but two small matmuls can be slower than one big one: at decode (a few rows) the time
is the weights' memory traffic plus a fixed cost per kernel, and matmul kernels like some
widths better than others. `measure_curve` times, on the device, the dense layer and the
factorized one (`FactorizedLinear`, the layer an export runs) at a grid of ranks for one
row count; a `KernelCurve` gives a layer's expected time at any rank (linear between the
measured ranks) and `cap`, the largest rank (a multiple of `multiple`) at which the
factorized layer is no slower than the dense one.

Timing is injected (`Timer`), so the arithmetic is tested on exact costs.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear

__all__ = [
    "ROWS",
    "KernelCurve",
    "Timer",
    "best_seconds",
    "expected_speedup",
    "grid_ranks",
    "measure_curve",
    "speed_cap",
]

ROWS = (1, 8, 256)
"""Rows per call that matter: decode at batch 1 and 8 (one token each), and a prefill block."""

GRID = 16  # ranks timed per curve, spread over [1, min(shape)]

Timer = Callable[[nn.Module, torch.Tensor], float]
"""Seconds one call of a layer takes on an input (the measuring rule: `best_seconds`)."""


@dataclass(frozen=True)
class KernelCurve:
    """One layer shape at one row count: the dense time and the factorized times by rank."""

    shape: tuple[int, int]  # (out_features, in_features)
    rows: int
    dense: float  # seconds per call
    ranks: tuple[int, ...]  # ascending
    times: tuple[float, ...]  # seconds per call at each rank

    def at(self, rank: int | None) -> float:
        """Expected seconds at `rank` (None: dense), linear between the measured ranks."""
        if rank is None:
            return self.dense
        if len(self.ranks) == 1:
            return self.times[0]
        i = min(max(bisect.bisect_left(self.ranks, rank), 1), len(self.ranks) - 1)
        (r0, r1), (t0, t1) = self.ranks[i - 1 : i + 1], self.times[i - 1 : i + 1]
        return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)

    def cap(self, multiple: int = 1) -> int:
        """The largest rank, a multiple of `multiple`, no slower than dense (0: none is)."""
        best = 0
        for r in range(multiple, self.ranks[-1] + 1, multiple):
            if self.at(r) <= self.dense:
                best = r
        return best

    def to_dict(self) -> dict:
        return {"dense": self.dense, "ranks": list(self.ranks), "times": list(self.times)}

    @classmethod
    def from_dict(cls, shape: tuple[int, int], rows: int, d: Mapping) -> KernelCurve:
        return cls(tuple(shape), rows, float(d["dense"]), tuple(d["ranks"]), tuple(d["times"]))


def grid_ranks(shape: tuple[int, int], points: int = GRID) -> tuple[int, ...]:
    """`points` ranks spread over [1, min(shape)], multiples of 8 where the width allows."""
    width = min(shape)
    step = 8 if width >= 8 * points else 1
    ranks = {max(1, step * round(width * i / points / step)) for i in range(1, points + 1)}
    return tuple(sorted(min(r, width) for r in ranks))


def best_seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 5, floor: float = 2e-3) -> float:
    """Seconds per call: the best of `repeats` runs of n calls (n so that a run takes at
    least `floor` seconds), after a warm-up call."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        layer(x)
        sync()
        start = time.perf_counter()
        layer(x)
        sync()
        calls = max(1, math.ceil(floor / max(time.perf_counter() - start, 1e-7)))
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                layer(x)
            sync()
            best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure_curve(
    shape: tuple[int, int],
    rows: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    timer: Timer = best_seconds,
    ranks: Iterable[int] | None = None,
) -> KernelCurve:
    """Time the dense layer of `shape` and its factorized form at `ranks` (default
    `grid_ranks`) on `rows` random rows. The layers are timed in turns, a rank and then dense
    again, and each rank is kept as its ratio to the dense time beside it, scaled to the
    median dense time: a machine that slows down for a while slows both sides of a ratio,
    and the dense time is not the luckiest of many runs set against one run of each rank."""
    out_f, in_f = shape
    kw = {"device": device, "dtype": dtype}
    torch.manual_seed(0)
    x = torch.randn(rows, in_f, **kw)
    dense = nn.Linear(in_f, out_f, **kw)
    ranks = tuple(sorted(set(ranks))) if ranks is not None else grid_ranks(shape)
    pairs = []
    for rank in ranks:
        factorized = timer(FactorizedLinear(in_f, out_f, rank, **kw), x)
        pairs.append((factorized, timer(dense, x)))
    middle = statistics.median(d for _, d in pairs)
    times = tuple(f * (middle / d) if d > 0 else f for f, d in pairs)
    return KernelCurve(tuple(shape), rows, middle, ranks, times)


def speed_cap(curves: Iterable[KernelCurve], multiple: int = 1) -> int:
    """The largest rank (a multiple of `multiple`) no slower than dense at every row count."""
    return min(curve.cap(multiple) for curve in curves)


def expected_speedup(
    layers: Mapping[str, tuple[tuple[int, int], int | None]],
    curves: Mapping[tuple[tuple[int, int], int], KernelCurve],
    rows: int,
) -> float:
    """Dense time over expected time of `layers` ({name: (shape, rank or None for dense)})
    at `rows` rows, from `curves` keyed by (shape, rows)."""
    dense = sum(curves[shape, rows].dense for shape, _ in layers.values())
    chosen = sum(curves[shape, rows].at(rank) for shape, rank in layers.values())
    return dense / chosen if chosen > 0 else 1.0
