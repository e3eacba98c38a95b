"""Budget allocators: pure functions from per-layer error curves and shapes to ranks.

An allocator shares `keep` of the targeted weight parameters between layers. Each layer
offers its singular directions one at a time; direction i costs (in + out) parameters and
lowers an error objective by `gains[layer][i]`. `greedy_ranks` takes directions in order of
gain per parameter until the budget is spent: for non-increasing gains (squared singular
values are) it is the optimal split of the budget among factorized layers. A layer can also
stay dense, which buys every direction's gain for in * out parameters, including those past
break-even that no rank reaches: with `dense_offer` that is one more offer per layer (on the
upper concave hull of the layer's offers), so the budget keeps a layer dense where that buys
the most (SmolLM2 keep 0.8: held-out perplexity 1.63x dense -> 1.34x with data, 2.80x ->
1.82x without; docs/benchmarks.md, session 11).

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
    caps: Mapping[str, int] | None = None,
    dense_offer: bool = False,
) -> dict[str, int]:
    """Ranks (>= 1) whose factorized parameters sum to at most `keep` of the dense ones.

    Every layer first gets rank 1; then directions are taken in order of gain / (in + out)
    while they fit. A layer is offered at most ceil(break-even) directions: at that rank it
    is kept dense, which costs in * out <= ceil(k*) * (in + out), so never more than counted.
    A layer with a cap (`caps`: the largest rank it may have factorized) is offered its
    directions up to the cap only; cap 0 means dense outright.

    With `dense_offer`, going dense is also one offer of its own for every layer, at its cap
    (or the largest rank below break-even): all its remaining directions' gain for the rest
    of in * out, where counting directions one at a time leaves out the gain of those past
    break-even. Where that offer buys more per parameter than the last directions below it,
    those are dropped (the upper concave hull), so each layer's offers stay in decreasing
    order. A big offer that does not fit would strand the budget its layer's dropped
    directions could use: such layers are offered their directions again, one at a time, in
    another round, until every dense offer left is taken; the split with the largest total
    gain of the rounds (and of the split without dense offers) is returned. A layer kept
    dense comes back at a rank above its bound (min(shape) from the offer).
    """
    caps = caps or {}
    best = _greedy(gains, shapes, keep, caps, offers=set())
    if not dense_offer:
        return best
    offers = {n for n in gains if _bound(shapes[n], caps.get(n)) > 0}
    while offers:
        ranks = _greedy(gains, shapes, keep, caps, offers)
        best = max(best, ranks, key=lambda r: _total_gain(gains, shapes, caps, r))
        missed = {n for n in offers if ranks[n] <= _bound(shapes[n], caps.get(n))}
        if not missed:
            break
        offers -= missed
    return best


def _bound(shape: tuple[int, int], cap: int | None) -> int:
    """The largest rank a layer is kept factorized at: its cap, below break-even."""
    below = floor_breakeven(*shape)
    return below if cap is None else min(cap, below)


def _total_gain(gains, shapes, caps, ranks: Mapping[str, int]) -> float:
    """The gain a split buys: a factorized layer its first `rank` directions, a dense one all."""
    total = 0.0
    for name, rank in ranks.items():
        g = gains[name].double().flatten().clamp_min(0)
        dense = rank > _bound(shapes[name], caps.get(name))
        total += float(g.sum() if dense else g[:rank].sum())
    return total


def _greedy(gains, shapes, keep: float, caps, offers: set[str]) -> dict[str, int]:
    """The greedy split; the layers in `offers` have a dense offer (the hull)."""
    names = list(gains)
    budget = keep * sum(shapes[n][0] * shapes[n][1] for n in names)
    ranks = {n: 1 for n in names}
    per_gain, per_cost, per_size, owner = [], [], [], []
    for idx, name in enumerate(names):
        out_f, in_f = shapes[name]
        cost = float(out_f + in_f)
        g = gains[name].double().flatten().clamp_min(0)
        cap = caps.get(name)
        if cap == 0 or (offers and _bound(shapes[name], cap) == 0):
            budget -= out_f * in_f  # dense outright
            ranks[name] = min(shapes[name])
            continue
        budget -= cost  # rank 1
        if name in offers:
            bound = _bound(shapes[name], cap)
            gain, costs, size = _capped_offer(g, cost, out_f * in_f, bound, min(out_f, in_f))
        else:
            below = floor_breakeven(out_f, in_f) + 1  # the last one: kept dense
            taken = g[1 : min(below, below if cap is None else cap, min(shapes[name]))]
            gain, size = taken / cost, torch.ones_like(taken)
            costs = torch.full_like(taken, cost)
        per_gain.append(gain)
        per_cost.append(costs)
        per_size.append(size)
        owner.append(torch.full_like(gain, idx))
    if not per_gain:
        return ranks
    order = torch.cat(per_gain).argsort(descending=True, stable=True)
    added = [0] * len(names)
    items = zip(*(torch.cat(t)[order].tolist() for t in (per_cost, owner, per_size)), strict=True)
    for cost, idx, size in items:  # best first; what does not fit is passed over
        idx = int(idx)
        if size > 1:  # the jump to dense: what is left of in * out after the ranks taken
            out_f, in_f = shapes[names[idx]]
            cost = out_f * in_f - (1 + added[idx]) * (out_f + in_f)
        if cost <= budget:
            budget -= cost
            added[idx] += int(size)
    for idx, name in enumerate(names):
        if added[idx] > 0:
            ranks[name] = min(1 + int(added[idx]), min(shapes[name]))
    return ranks


def _capped_offer(
    g: torch.Tensor, cost: float, dense_cost: int, cap: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-parameter gains, costs and rank steps of a capped layer's offers: directions
    2..h (h <= cap, the hull's corner) and the step to dense (its rank step reaches `width`)."""
    steps = g[1:cap]  # directions 2..cap, one rank each
    # with k of them taken (rank 1 + k), going dense adds tail[k] for jump_cost[k] parameters
    tail = g[1:].sum() - torch.cat([g.new_zeros(1), steps.cumsum(0)])
    jump_cost = dense_cost - (1 + torch.arange(len(steps) + 1, dtype=g.dtype)) * cost
    # the hull's corner: the first k whose next direction buys no more than jumping from k
    stop = (steps / cost <= tail[:-1] / jump_cost[:-1]).nonzero()
    h = int(stop[0]) if len(stop) else len(steps)
    rest = float(tail[h])
    jump = float(jump_cost[h])
    gain = torch.cat([steps[:h] / cost, torch.tensor([rest / jump], dtype=g.dtype)])
    costs = torch.cat([torch.full((h,), cost, dtype=g.dtype), torch.tensor([jump], dtype=g.dtype)])
    size = torch.cat([torch.ones(h, dtype=g.dtype), torch.tensor([width], dtype=g.dtype)])
    return gain, costs, size


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
