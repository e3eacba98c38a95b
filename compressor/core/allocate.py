"""Budget allocators: pure functions from per-layer error curves and shapes to ranks.

An allocator shares `keep` of the targeted weight parameters between layers. Each layer
offers its singular directions one at a time; direction i costs (in + out) parameters and
lowers an error objective by `gains[layer][i]`. `greedy_ranks` takes directions in order of
gain per parameter until the budget is spent: for non-increasing gains (squared singular
values are) it is the optimal split of the budget.

What the gains mean decides the allocation:
  - output-aware (the default under `keep` with calibration data): s_i(W L)^2 times the
    layer's output sensitivity, i.e. the drop of the model-output error that keeping
    direction i buys (`output_gains`); comparable across layers because every term is in
    units of the same model output;
  - `relative_gains`: s_i^2 / ||W||_F^2, each layer's own relative spectrum (dlnc before
    issue 11; it starves wide layers whose spectra are flat);
  - `uniform_ranks`: the same fraction of every layer's parameters (the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from compressor.core.linalg import floor_breakeven

__all__ = ["greedy_ranks", "output_gains", "relative_gains", "uniform_ranks"]


def greedy_ranks(
    gains: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    keep: float,
) -> dict[str, int]:
    """Ranks (>= 1) whose factorized parameters sum to at most `keep` of the dense ones.

    Every layer first gets rank 1; then directions are taken in order of gain / (in + out)
    while they fit. A layer is offered at most ceil(break-even) directions: at that rank it
    is kept dense, which costs in * out <= ceil(k*) * (in + out), so never more than counted.
    """
    names = list(gains)
    budget = keep * sum(shapes[n][0] * shapes[n][1] for n in names)
    budget -= sum(sum(shapes[n]) for n in names)  # rank 1 everywhere
    per_gain, per_cost, owner = [], [], []
    for idx, name in enumerate(names):
        cost = float(sum(shapes[name]))
        offered = min(floor_breakeven(*shapes[name]) + 1, min(shapes[name]))
        g = gains[name].double().flatten()[1:offered].clamp_min(0)
        per_gain.append(g / cost)
        per_cost.append(torch.full_like(g, cost))
        owner.append(torch.full_like(g, idx))
    if not names:
        return {}
    order = torch.cat(per_gain).argsort(descending=True, stable=True)
    spent = torch.cat(per_cost)[order].cumsum(0)
    taken = torch.cat(owner)[order][spent <= budget].long()
    counts = torch.bincount(taken, minlength=len(names)).tolist()
    return {name: 1 + c for name, c in zip(names, counts, strict=True)}


def output_gains(
    spectra: Mapping[str, torch.Tensor], sensitivity: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """s_i^2 times the layer's output sensitivity (1 where none is given): with s the
    singular values of W L, the drop of the layer's output error per kept direction, scaled
    by how much an error at that layer's output moves the model's output."""
    sens = sensitivity or {}
    return {
        n: s.double().square() * (float(sens[n].double().mean()) if n in sens else 1.0)
        for n, s in spectra.items()
    }


def relative_gains(spectra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """s_i^2 / sum_j s_j^2: each layer's share of its own energy (scale-free per layer)."""
    out = {}
    for name, s in spectra.items():
        energy = s.double().square()
        out[name] = energy / (float(energy.sum()) or 1.0)
    return out


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], keep: float) -> dict[str, int]:
    """The same fraction `keep` of every layer: k = floor(keep * in * out / (in + out))."""
    return {
        n: max(1, min(math.floor(keep * o * i / (o + i)), floor_breakeven(o, i)))
        for n, (o, i) in shapes.items()
    }
