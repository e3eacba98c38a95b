"""The nonlinear experiment: an MLP whose hidden width x width layer is a linear chain.

Wide chain: (width x width)^L. Compressed chain: (width x k)(k x k)...(k x width), k = 2r, no
activation inside the chain (docs/method.md end of section 2). Both are trained the same way, full
batch, on scikit-learn's handwritten digits (8x8 images, 10 classes; bundled, so offline).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from compressor.errors import DlncError

__all__ = ["LinearChain", "MLPConfig", "MLPResult", "MLPRun", "load_digits_split", "run_mlp"]


@dataclass
class MLPConfig:
    """The digits experiment."""

    width: int = 1024  # hidden width of the MLP (the wide chain is width x width)
    r: int = 8  # the compressed chain has inner width 2r
    depth: int = 3  # number of factors in the linear chain
    epochs: int = 300  # full-batch gradient steps
    lr: float = 0.05  # step size (SGD with momentum)
    momentum: float = 0.9  # heavy-ball momentum
    alpha: float = 1.0  # discrepant lr: the compressed chain's outer factors step alpha * lr
    eps: float = 1.0  # scale of the chains' orthogonal init
    test_fraction: float = 0.25  # held-out share of the 1797 images
    seed: int = 0  # seeds the split and the initialisation

    def __post_init__(self) -> None:
        if self.width < 2:
            raise DlncError(f"`width` must be >= 2, got {self.width}")
        if not 1 <= self.r <= self.width // 2:
            raise DlncError(f"`r` must be in [1, width/2 = {self.width // 2}], got {self.r}")
        if self.depth < 2:
            raise DlncError(f"`depth` must be >= 2, got {self.depth}")
        if self.epochs < 1:
            raise DlncError(f"`epochs` must be >= 1, got {self.epochs}")
        for name in ("lr", "alpha", "eps"):
            if not getattr(self, name) > 0:
                raise DlncError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise DlncError(f"`test_fraction` must be in (0, 1), got {self.test_fraction}")


class LinearChain(nn.Module):
    """x -> x W_1^T W_2^T ... W_L^T with scaled orthogonal factors and no activation."""

    def __init__(self, dims: list[int], eps: float, generator: torch.Generator) -> None:
        super().__init__()
        factors = []
        for fan_in, fan_out in itertools.pairwise(dims):
            q, _ = torch.linalg.qr(
                torch.randn(max(fan_in, fan_out), min(fan_in, fan_out), generator=generator)
            )
            factors.append(nn.Parameter(eps * (q if fan_out >= fan_in else q.T)))
        self.factors = nn.ParameterList(factors)

    def forward(self, x: Tensor) -> Tensor:
        for w in self.factors:
            x = x @ w.T
        return x


def load_digits_split(test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised digits features and labels, split at random into train and test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def build_mlp(config: MLPConfig, chain_width: int | None) -> nn.Sequential:
    """64 -> width, ReLU, chain (wide if chain_width is None), ReLU, width -> 10."""
    generator = torch.Generator().manual_seed(config.seed)
    inner = config.width if chain_width is None else chain_width
    dims = [config.width, *[inner] * (config.depth - 1), config.width]
    with torch.random.fork_rng():  # the same first and last layers for both models
        torch.manual_seed(config.seed)
        first, last = nn.Linear(64, config.width), nn.Linear(config.width, 10)
    chain = LinearChain(dims, config.eps, generator)
    return nn.Sequential(first, nn.ReLU(), chain, nn.ReLU(), last)


def _optimizer(model: nn.Sequential, config: MLPConfig, alpha: float) -> torch.optim.SGD:
    """SGD; the chain's first and last factors step alpha * lr, the rest lr."""
    factors = list(model[2].factors)
    outer = [factors[0], factors[-1]]
    rest = [p for p in model.parameters() if all(p is not q for q in outer)]
    groups = [{"params": rest}, {"params": outer, "lr": alpha * config.lr}]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


@dataclass
class MLPRun:
    """One trained model: held-out accuracy, training time, chain size."""

    test_accuracy: float
    train_accuracy: float
    seconds: float
    chain_parameters: int


@dataclass
class MLPResult:
    wide: MLPRun
    compressed: MLPRun

    @property
    def speedup_seconds(self) -> float:
        return self.wide.seconds / max(self.compressed.seconds, 1e-12)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_mlp(
    model: nn.Sequential,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    config: MLPConfig,
    alpha: float,
    callback: Callable[[int, int, dict], None] | None = None,
) -> MLPRun:
    """Full-batch training for `config.epochs` steps; the clock covers the steps only."""
    x_train, y_train, x_test, y_test = data
    optimizer, loss_fn = _optimizer(model, config, alpha), nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_train), y_train)
        loss.backward()
        optimizer.step()
        if callback is not None and (epoch % 10 == 0 or epoch == config.epochs):
            callback(epoch, config.epochs, {"train_loss": loss.item()})
    seconds = time.perf_counter() - start
    chain_parameters = sum(p.numel() for p in model[2].parameters())
    return MLPRun(
        _accuracy(model, x_test, y_test),
        _accuracy(model, x_train, y_train),
        seconds,
        chain_parameters,
    )


def run_mlp(
    config: MLPConfig,
    on_wide: Callable[[int, int, dict], None] | None = None,
    on_compressed: Callable[[int, int, dict], None] | None = None,
) -> MLPResult:
    """Train the wide-chain and the compressed-chain MLP on the same digits split."""
    data = load_digits_split(config.test_fraction, config.seed)
    wide = train_mlp(build_mlp(config, None), data, config, 1.0, on_wide)
    compressed_model = build_mlp(config, 2 * config.r)
    compressed = train_mlp(compressed_model, data, config, config.alpha, on_compressed)
    return MLPResult(wide, compressed)
