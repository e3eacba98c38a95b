"""Output-aware ranks and factors: weigh each layer's truncation error by its effect on the
model's output, so the errors of different layers can share one budget.

With L L^T the layer's (damped, per-token) input Gram and D = diag(d) the square roots of its
output sensitivity per channel (`methods.sensitivity`), a change E of the weight moves the
model's output by about ||D E L||_F (a diagonal Fisher / Gauss-Newton approximation of the
output's Jacobian on both sides of the layer). So:
  - whiten truncates D W L: W' = D^-1 trunc_k(D W L) L^+, whose error in that metric is
    sqrt(sum_{i>k} s_i(D W L)^2), and its gains are s_i(D W L)^2;
  - svd and dynamics keep their factors (W projected on input directions q_i); the gain of
    direction q_i is the output error of dropping it alone, ||D W q_i||^2 * ||L^T q_i||^2.
The gains feed `core.allocate.greedy_ranks`. Pure tensor maths apart from the factor function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compressor.core.compress import FactorFn
from compressor.core.whitening import Whitener, whitened_factors, whitened_spectrum, whiteners

__all__ = [
    "CHANNEL_DAMPING",
    "channel_weights",
    "output_whitened_factor_fn",
    "output_whitened_factors",
    "output_whitened_spectrum",
    "projection_gains",
    "projection_output_gains",
]

CHANNEL_DAMPING = 0.1
"""Added to each channel's sensitivity, as a multiple of their mean: no channel is ignored."""


def channel_weights(sensitivity: torch.Tensor, damping: float = CHANNEL_DAMPING) -> torch.Tensor:
    """d_j = sqrt(F_j + damping * mean(F)), float64; all ones for a zero sensitivity."""
    f = sensitivity.detach().double().clamp_min(0)
    mean = float(f.mean())
    if not mean > 0:
        return torch.ones_like(f)
    return (f + damping * mean).sqrt()


def output_whitened_spectrum(
    w: torch.Tensor, whitener: Whitener | None, d: torch.Tensor
) -> torch.Tensor:
    """Singular values of D W L (of D W without a whitener), as `whitened_spectrum`."""
    return whitened_spectrum(d[:, None] * w.detach().double(), whitener)


def output_whitened_factor_fn(
    weights: Mapping[str, torch.Tensor],
    whiteners: Mapping[str, Whitener | None],
    d: Mapping[str, torch.Tensor],
) -> FactorFn:
    """Factors minimising ||D (W - W') L||_F; rel error is relative in that metric."""

    def factor(name: str, module: nn.Module, rank: int):
        return output_whitened_factors(weights[name], whiteners[name], d[name], rank)

    return factor


def output_whitened_factors(
    w: torch.Tensor, whitener: Whitener | None, d: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, rel) minimising ||D (W - up down) L||_F at `rank`; rel is relative in that
    metric. The streamed whiten pass calls it with a weight read from the checkpoint."""
    up, down, _, rel = whitened_factors(d[:, None] * w.double(), whitener, rank)
    return up / d[:, None], down, rel


def projection_gains(
    w: torch.Tensor, q: torch.Tensor, whitener: Whitener | None, d: torch.Tensor
) -> torch.Tensor:
    """||D W q_i||^2 * ||L^T q_i||^2 for each column q_i of `q` (in x k, orthonormal): the
    output error of dropping direction i alone from W Q Q^T."""
    w64, q64 = w.detach().double(), q.detach().double()
    out = (d[:, None] * (w64 @ q64)).square().sum(0)
    spread = torch.ones_like(out) if whitener is None else (whitener.root.T @ q64).square().sum(0)
    return out * spread


def projection_output_gains(method, weights, inputs) -> dict[str, torch.Tensor]:
    """The output-aware gains of a method whose factors keep W on its `directions` (svd,
    dynamics): `projection_gains` with each layer's whitener and channel weights."""
    roots = inputs.once("whiteners", lambda: whiteners(inputs.grams, inputs.damping))
    gains = {}
    for name, w in weights.tensors.items():
        d = channel_weights(inputs.sensitivity[name])
        gains[name] = projection_gains(w, method.directions(name, weights, inputs), roots[name], d)
    return gains
