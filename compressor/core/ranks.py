"""Choosing ranks: a fixed rank, an energy threshold, or a global parameter budget.

Every policy works on spectra (singular values, descending) and layer shapes only, so the
same allocation serves plain SVD spectra, activation-aware ones and update spectra.
`keep` is a fraction of the *targeted layers' weight parameters* (biases are kept whole
and not counted); a layer whose rank reaches its break-even rank stays dense. Under
`speed="never-slower"` a layer's `caps` (the largest rank at which its factorized form is
no slower than dense on the device: `core.kernels`) bound its rank too: above it the layer
stays dense, and under `keep` the budget goes where it buys the most within those bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from compressor.core.allocate import greedy_ranks, relative_gains
from compressor.core.linalg import breakeven_rank, energy_rank
from compressor.errors import DlncError

__all__ = ["SPEEDS", "LayerRank", "RankPolicy", "allocate_ranks", "factor_params"]

SPEEDS = ("smallest", "never-slower")
"""What ranks aim at: the smallest model for the budget, or no layer slower than dense."""


@dataclass(frozen=True)
class RankPolicy:
    """How to choose ranks; exactly one of `rank`, `energy`, `keep` is set."""

    rank: int | None = None  # the same rank for every layer
    energy: float | None = None  # keep this fraction of each layer's spectral energy, in (0, 1]
    keep: float | None = None  # fraction of the targeted weight parameters kept, in (0, 1)
    multiple: int = 1  # round every rank to a multiple of this (e.g. 8 for tensor cores)
    overrides: Mapping[str, int] = field(default_factory=dict)  # fixed ranks by layer name
    dense_at_breakeven: bool = True  # keep a layer dense when its rank reaches break-even
    speed: str = "smallest"  # a value of SPEEDS
    caps: Mapping[tuple[int, int], int] = field(default_factory=dict)  # never-slower ranks
    # by (out, in) shape, measured on the device by the workflow before allocating

    def __post_init__(self) -> None:
        chosen = [n for n in ("keep", "energy", "rank") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise DlncError(f"give exactly one of keep, energy, rank (got {chosen or 'none'})")
        if self.rank is not None and self.rank < 1:
            raise DlncError(f"`rank` must be >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise DlncError(f"`energy` must be in (0, 1], got {self.energy}")
        if self.keep is not None and not 0.0 < self.keep < 1.0:
            raise DlncError(f"`keep` must be in (0, 1), got {self.keep}")
        if self.multiple < 1:
            raise DlncError(f"`multiple` must be >= 1, got {self.multiple}")
        if self.speed not in SPEEDS:
            raise DlncError(f"`speed` must be one of {', '.join(SPEEDS)}, got {self.speed!r}")

    def cap_of(self, shape: tuple[int, int]) -> int | None:
        """The largest rank no slower than dense for `shape` (None: not bounded by speed)."""
        if self.speed != "never-slower":
            return None
        if tuple(shape) not in self.caps:
            raise DlncError(f"`speed` never-slower: no measured cap for a {shape} layer")
        return self.caps[tuple(shape)]


@dataclass(frozen=True)
class LayerRank:
    """The decision for one layer: a rank, or dense (rank None) with the reason."""

    rank: int | None
    reason: str = ""

    @property
    def dense(self) -> bool:
        return self.rank is None


def factor_params(shape: tuple[int, int], rank: int | None) -> int:
    """Weight parameters of a layer kept at `rank` (dense when None)."""
    out_f, in_f = shape
    return out_f * in_f if rank is None else rank * (out_f + in_f)


def allocate_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    policy: RankPolicy,
    gains: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerRank]:
    """A rank per layer under `policy`; layers at or above break-even stay dense.

    Under `keep`, `gains` (the drop of an output error per kept direction, comparable across
    layers: `core.allocate`) share the budget; without them each layer's relative spectrum
    does (the data-free rule)."""
    caps = {n: policy.cap_of(shapes[n]) for n in spectra}
    if policy.keep is not None:
        bounded = {n: c for n, c in caps.items() if c is not None}
        # going dense is an offer where gains compare across layers (output-aware, with data)
        # and where speed bounds the ranks; each layer's relative spectrum alone is not a
        # measure of what keeping it whole is worth next to another layer
        offer = policy.dense_at_breakeven and (gains is not None or policy.speed != "smallest")
        raw = greedy_ranks(gains if gains is not None else relative_gains(spectra),
                           shapes, policy.keep, bounded, offer)  # fmt: skip
    elif policy.energy is not None:
        raw = {n: max(1, energy_rank(s, policy.energy)) for n, s in spectra.items()}
    else:
        raw = {n: _checked_rank(n, shapes[n], policy.rank) for n in spectra}
    for name, rank in policy.overrides.items():
        if name in raw:
            raw[name] = _checked_rank(name, shapes[name], rank)
    down = policy.keep is not None  # under a budget, round down so it is never overspent
    rounded = {n: _round(r, policy.multiple, shapes[n], down) for n, r in raw.items()}
    if not policy.dense_at_breakeven and policy.speed == "smallest":
        return {n: LayerRank(r) for n, r in rounded.items()}
    return {
        n: _decide(shapes[n], r, caps[n], policy.dense_at_breakeven) for n, r in rounded.items()
    }


def _checked_rank(name: str, shape: tuple[int, int], rank: int) -> int:
    if not 1 <= rank <= min(shape):
        raise DlncError(
            f"rank {rank} is out of range for {name} ({shape[0]}x{shape[1]}): "
            f"must be in [1, {min(shape)}]"
        )
    return rank


def _round(rank: int, multiple: int, shape: tuple[int, int], down: bool = False) -> int:
    if multiple == 1:
        return rank
    steps = rank // multiple if down else round(rank / multiple)
    return min(max(multiple, multiple * steps), min(shape))


def _decide(shape: tuple[int, int], rank: int, cap: int | None, at_breakeven: bool) -> LayerRank:
    k_star = breakeven_rank(*shape)
    if cap is not None and rank > cap:
        why = "no rank is" if cap == 0 else f"only ranks <= {cap} are"
        return LayerRank(None, f"kept dense: {why} as fast as dense on this device")
    if at_breakeven and rank >= min(shape) > k_star + 1:  # the allocator's dense offer
        return LayerRank(None, f"kept dense: buys more than any rank below break-even {k_star:.0f}")
    if at_breakeven and rank >= k_star:
        return LayerRank(None, f"rank {rank} >= break-even {k_star:.0f}: kept dense")
    return LayerRank(rank)
