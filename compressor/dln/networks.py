"""Deep linear networks W = W_L ... W_1: the wide one and the compressed one
(docs/method.md section 2).

A network is a list of weight matrices, first layer first, plus one step-size multiplier per
layer (the compressed network's outer layers take the discrepant learning rate alpha * eta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compressor.errors import DlncError

__all__ = [
    "DeepLinearNetwork",
    "compressed_network",
    "end_to_end",
    "prefix_products",
    "random_orthogonal",
    "wide_network",
]


@dataclass
class DeepLinearNetwork:
    """Layers W_1 ... W_L (W_1 first) and the step-size multiplier of each layer."""

    weights: list[Tensor]
    lr_scales: list[float]

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]

    def num_parameters(self) -> int:
        return sum(w.numel() for w in self.weights)

    def end_to_end(self) -> Tensor:
        return end_to_end(self.weights)


def _check_depth(depth: int) -> None:
    if depth < 2:
        raise DlncError(f"`depth` must be >= 2, got {depth}")


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian with the signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def wide_network(
    d: int, depth: int, eps: float, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> DeepLinearNetwork:
    """Width-d network with scaled orthogonal init W_l(0) = eps * O_l, plain GD (no alpha)."""
    _check_depth(depth)
    weights = [eps * random_orthogonal(d, generator, dtype) for _ in range(depth)]
    return DeepLinearNetwork(weights, [1.0] * depth)


def compressed_network(
    surrogate: Tensor, width: int, depth: int, eps: float, alpha: float = 1.0
) -> DeepLinearNetwork:
    """Width-`width` network with spectral init from the top singular vectors of `surrogate`.

    W_1 = eps * V_k^T, W_l = eps * I_k (1 < l < L), W_L = eps * U_k; the outer layers step
    alpha times faster than the inner ones.
    """
    _check_depth(depth)
    if not 1 <= width <= min(surrogate.shape):
        raise DlncError(f"`width` must be in [1, {min(surrogate.shape)}], got {width}")
    u, _, vh = torch.linalg.svd(surrogate)
    eye = torch.eye(width, dtype=surrogate.dtype, device=surrogate.device)
    inner = [eps * eye.clone() for _ in range(depth - 2)]
    weights = [eps * vh[:width, :].contiguous(), *inner, eps * u[:, :width].contiguous()]
    return DeepLinearNetwork(weights, [alpha, *[1.0] * (depth - 2), alpha])


def prefix_products(weights: list[Tensor]) -> list[Tensor]:
    """[W_1, W_2 W_1, ..., W_L ... W_1]: the last entry is the end-to-end matrix."""
    products = [weights[0]]
    for w in weights[1:]:
        products.append(w @ products[-1])
    return products


def end_to_end(weights: list[Tensor]) -> Tensor:
    """The end-to-end matrix W_L ... W_1."""
    return prefix_products(weights)[-1]
