"""Per-layer spectrum statistics, for `dlnc inspect` and reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from compressor.core.linalg import (
    breakeven_rank,
    effective_rank,
    energy_rank,
    numerical_rank,
    stable_rank,
)

__all__ = ["SpectrumStats", "spectrum_stats"]


@dataclass
class SpectrumStats:
    """How compressible one layer's weight is, by several measures of its spectrum."""

    name: str
    shape: tuple[int, int]  # (out, in)
    energy_rank_90: int  # smallest k keeping 90% of sum s_i^2
    energy_rank_99: int  # smallest k keeping 99% of sum s_i^2
    effective_rank: float  # Roy & Vetterli, exp of the entropy of s / sum s
    stable_rank: float  # ||W||_F^2 / ||W||_2^2
    numerical_rank: int  # s_i above s_1 * max(shape) * eps(float32)
    breakeven_rank: float  # in*out/(in+out): a rank at or above it saves nothing

    def to_dict(self) -> dict:
        return asdict(self)


def spectrum_stats(name: str, shape: tuple[int, int], s: torch.Tensor) -> SpectrumStats:
    return SpectrumStats(
        name=name,
        shape=shape,
        energy_rank_90=energy_rank(s, 0.9),
        energy_rank_99=energy_rank(s, 0.99),
        effective_rank=effective_rank(s),
        stable_rank=stable_rank(s),
        numerical_rank=numerical_rank(s, shape),
        breakeven_rank=breakeven_rank(*shape),
    )
