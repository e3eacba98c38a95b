"""Matrix-recovery problems of docs/method.md section 2: the target, the data, losses and errors.

Each problem knows its training loss as a function of the end-to-end matrix W, the gradient of
that loss with respect to W (so any factorisation of W can be trained by the chain rule), its
test / recovery error, and the surrogate matrix whose singular vectors seed the compressed network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from compressor.errors import DlncError

__all__ = [
    "TASKS",
    "Completion",
    "Factorization",
    "Problem",
    "ProblemConfig",
    "Sensing",
    "make_problem",
    "make_target",
]

TASKS = ("factorization", "completion", "sensing")


@dataclass
class ProblemConfig:
    """What to recover and from which data."""

    task: str = "completion"  # factorization | completion | sensing
    d: int = 100  # the target M is d x d
    r: int = 5  # rank of M; the compressed network has width 2r, so r <= d/2
    observed: float = 0.3  # completion: fraction of the entries observed, in (0, 1]
    measurements: int = 4000  # sensing: number m of Gaussian measurements
    seed: int = 0  # seeds the target and its data

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DlncError(f"`task` must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.d < 2:
            raise DlncError(f"`d` must be >= 2, got {self.d}")
        if self.r < 1:
            raise DlncError(f"`r` must be >= 1, got {self.r}")
        if 2 * self.r > self.d:
            raise DlncError(f"`r` must be <= d/2 = {self.d // 2}, got {self.r}")
        if not 0.0 < self.observed <= 1.0:
            raise DlncError(f"`observed` must be in (0, 1], got {self.observed}")
        if self.measurements < 1:
            raise DlncError(f"`measurements` must be >= 1, got {self.measurements}")


def make_target(d: int, r: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A rank-r d x d matrix with well-spread singular values.

    The singular triplets of a Gaussian matrix taken at the evenly spaced indices
    0, d/(2r), 2d/(2r), ... (the top half of its spectrum), as in the paper's code.
    """
    gaussian = torch.randn(d, d, generator=generator, dtype=dtype)
    u, s, vh = torch.linalg.svd(gaussian)
    idx = torch.tensor([k * d // (2 * r) for k in range(r)])
    return u[:, idx] @ torch.diag(s[idx]) @ vh[idx, :]


class Problem:
    """A recovery problem; subclasses define the loss, its gradient and the surrogate."""

    name = "problem"

    def __init__(self, target: Tensor) -> None:
        self.target = target

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Training loss at end-to-end matrix `w` (0-dim tensor) and its gradient d loss / d w."""
        raise NotImplementedError

    def test_error(self, w: Tensor) -> float:
        """The held-out metric of docs/method.md (recovery error unless a subclass says
        otherwise)."""
        return self.recovery_error(w)

    def surrogate(self) -> Tensor:
        """A d x d matrix computable from the data whose top singular vectors approximate M's."""
        raise NotImplementedError

    def recovery_error(self, w: Tensor) -> float:
        """Relative Frobenius error ||W - M||_F / ||M||_F."""
        return float(torch.linalg.norm(w - self.target) / torch.linalg.norm(self.target))

    def to(self, device: torch.device | str) -> Problem:
        """Move every tensor the problem holds to `device`."""
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, key, value.to(device))
        return self


class Factorization(Problem):
    """Fully observed target; loss 1/2 * mean((W - M)^2)."""

    name = "factorization"

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        residual = w - self.target
        loss = residual.square().sum().mul_(0.5 / residual.numel())
        return loss, residual * (1.0 / residual.numel())

    def surrogate(self) -> Tensor:
        return self.target


class Completion(Problem):
    """Observed entries Omega only; loss 1/2 * sum_Omega (W - M)^2 / |Omega|."""

    name = "completion"

    def __init__(self, target: Tensor, mask: Tensor) -> None:
        super().__init__(target)
        self.mask = mask.to(target.dtype)
        self.observed_target = target * self.mask
        self.held_out = 1.0 - self.mask
        self.n_observed = int(mask.sum())
        self.n_held_out = mask.numel() - self.n_observed
        self.fraction = self.n_observed / mask.numel()

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        residual = torch.mul(w, self.mask).sub_(self.observed_target)
        loss = residual.square().sum().mul_(0.5 / self.n_observed)
        return loss, residual * (1.0 / self.n_observed)

    def test_error(self, w: Tensor) -> float:
        """The same loss on the unobserved entries (the full loss if every entry is observed)."""
        if self.n_held_out == 0:
            return float(0.5 * (w - self.target).square().mean())
        residual = (w - self.target) * self.held_out
        return float(0.5 * residual.square().sum() / self.n_held_out)

    def surrogate(self) -> Tensor:
        return self.observed_target / self.fraction


class Sensing(Problem):
    """y_i = <A_i, M> with Gaussian A_i; loss 1/2 * sum_i (<A_i, W> - y_i)^2."""

    name = "sensing"

    def __init__(self, target: Tensor, operator: Tensor) -> None:
        super().__init__(target)
        self.operator = operator  # m x d^2, row i is vec(A_i)
        self.labels = operator @ target.reshape(-1)

    def loss_and_grad(self, w: Tensor) -> tuple[Tensor, Tensor]:
        residual = self.operator @ w.reshape(-1) - self.labels
        grad = (self.operator.T @ residual).reshape(w.shape)
        return 0.5 * residual.square().sum(), grad

    def surrogate(self) -> Tensor:
        m = self.operator.shape[0]
        return (self.operator.T @ self.labels).reshape(self.target.shape) / m


def _observation_mask(d: int, fraction: float, generator: torch.Generator) -> Tensor:
    """A boolean d x d mask with exactly int(fraction * d^2) entries set, uniformly at random."""
    n_observed = max(1, int(fraction * d * d))
    mask = torch.zeros(d * d, dtype=torch.bool)
    mask[torch.randperm(d * d, generator=generator)[:n_observed]] = True
    return mask.reshape(d, d)


def _sensing_operator(d: int, m: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """m Gaussian d x d matrices, flattened to rows, with standard deviation 1/m.

    docs/method.md writes "variance 1/m"; the paper's code scales by 1/m (variance 1/m^2), which is
    the scaling its step size eta = 20 is tuned for (with variance 1/m, GD diverges at eta = 20).
    """
    return torch.randn(m, d * d, generator=generator, dtype=dtype) / m


def make_problem(
    config: ProblemConfig,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Problem:
    """Build the problem `config` describes; the data are generated on the CPU, then moved."""
    generator = torch.Generator().manual_seed(config.seed)
    target = make_target(config.d, config.r, generator, dtype)
    if config.task == "factorization":
        problem: Problem = Factorization(target)
    elif config.task == "completion":
        problem = Completion(target, _observation_mask(config.d, config.observed, generator))
    else:
        operator = _sensing_operator(config.d, config.measurements, generator, dtype)
        problem = Sensing(target, operator)
    return problem.to(device)
