"""Full-batch gradient descent on a deep linear network, with a logged history.

Gradients are closed form: with G = d loss / d W for the end-to-end W = W_L ... W_1,
d loss / d W_l = (W_L ... W_{l+1})^T G (W_{l-1} ... W_1)^T. Wide and compressed networks run
the same code, so any difference in time per step comes from their shapes alone; for a width-k
network a step costs about 3 d^2 k multiply-adds (k = d for the wide one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from compressor.dln.networks import DeepLinearNetwork, prefix_products
from compressor.dln.problems import Problem
from compressor.errors import DlncError

__all__ = ["History", "ProgressCallback", "TrainConfig", "chain_gradients", "gd_step", "train"]

ProgressCallback = Callable[[int, int, dict], None]


@dataclass
class TrainConfig:
    """Gradient descent settings."""

    eta: float = 10.0  # step size of the inner layers (outer ones: alpha * eta, set per network)
    max_iters: int = 20_000  # give up after this many steps
    tol: float = 1e-12  # target training loss: stop once the loss is below it
    log_every: int = 50  # record the metrics every this many steps

    def __post_init__(self) -> None:
        if not self.eta > 0:
            raise DlncError(f"`eta` must be > 0, got {self.eta}")
        if self.max_iters < 1:
            raise DlncError(f"`max_iters` must be >= 1, got {self.max_iters}")
        if self.tol < 0:
            raise DlncError(f"`tol` must be >= 0, got {self.tol}")
        if self.log_every < 1:
            raise DlncError(f"`log_every` must be >= 1, got {self.log_every}")


@dataclass
class History:
    """Metrics at each logged iteration; `seconds` counts training steps only, not evaluation."""

    iterations: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)
    recovery_error: list[float] = field(default_factory=list)
    target_iteration: int | None = None  # first iteration whose training loss is below tol
    target_seconds: float | None = None  # training time up to that iteration

    @property
    def reached_target(self) -> bool:
        return self.target_iteration is not None

    def ms_per_step(self) -> float:
        """Median wall time of one step over the logged chunks (robust to load spikes)."""
        steps = torch.diff(torch.tensor(self.iterations, dtype=torch.float64))
        secs = torch.diff(torch.tensor(self.seconds, dtype=torch.float64))
        return float((secs / steps.clamp_min(1)).median()) * 1e3 if len(steps) else 0.0

    def summary(self) -> dict:
        """Iterations and seconds to the target (or of the whole run), final loss and errors."""
        return {
            "iterations": self.target_iteration if self.reached_target else self.iterations[-1],
            "seconds": self.target_seconds if self.reached_target else self.seconds[-1],
            "reached_target": self.reached_target,
            "ms_per_step": self.ms_per_step(),
            "final_train_loss": self.train_loss[-1],
            "final_test_error": self.test_error[-1],
            "final_recovery_error": self.recovery_error[-1],
        }


def chain_gradients(weights: list[Tensor], prefixes: list[Tensor], grad: Tensor) -> list[Tensor]:
    """d loss / d W_l for every layer, given the prefix products and G = d loss / d W."""
    back = [grad]  # back[j] = (W_L ... W_{L-j+1})^T G, built from the output side
    for w in reversed(weights[1:]):
        back.append(w.T @ back[-1])
    back.reverse()  # now back[i] multiplies layer i's gradient on the left
    grads = [back[0]]
    grads += [back[i] @ prefixes[i - 1].T for i in range(1, len(weights))]
    return grads


def gd_step(net: DeepLinearNetwork, problem: Problem, eta: float) -> Tensor:
    """One full-batch GD step in place; returns the training loss before the step."""
    prefixes = prefix_products(net.weights)
    loss, grad = problem.loss_and_grad(prefixes[-1])
    grads = chain_gradients(net.weights, prefixes, grad)
    for w, g, scale in zip(net.weights, grads, net.lr_scales, strict=True):
        w.sub_(g, alpha=eta * scale)
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(history: History, net: DeepLinearNetwork, problem: Problem, step: int, secs: float):
    w = net.end_to_end()
    history.iterations.append(step)
    history.seconds.append(secs)
    history.train_loss.append(float(problem.loss_and_grad(w)[0]))
    history.test_error.append(problem.test_error(w))
    history.recovery_error.append(problem.recovery_error(w))


def _run_chunk(net, problem, eta, n_steps) -> tuple[Tensor, float]:
    """`n_steps` GD steps; the losses before each step and the wall time they took."""
    device = net.weights[0].device
    _sync(device)
    start = time.perf_counter()
    losses = torch.stack([gd_step(net, problem, eta) for _ in range(n_steps)])
    _sync(device)
    return losses.cpu(), time.perf_counter() - start


def train(
    net: DeepLinearNetwork,
    problem: Problem,
    config: TrainConfig,
    callback: ProgressCallback | None = None,
) -> History:
    """Run GD until the training loss is below `config.tol` or `config.max_iters` steps."""
    history = History()
    step, elapsed = 0, 0.0
    with torch.no_grad():
        _log(history, net, problem, 0, 0.0)
        while step < config.max_iters and not history.reached_target:
            n_steps = min(config.log_every, config.max_iters - step)
            losses, secs = _run_chunk(net, problem, config.eta, n_steps)
            below = torch.nonzero(losses < config.tol)
            if len(below):  # 1) the target was hit inside this chunk: time it pro rata
                k = int(below[0])
                history.target_iteration = step + k
                history.target_seconds = elapsed + secs * k / n_steps
            step, elapsed = step + n_steps, elapsed + secs
            _log(history, net, problem, step, elapsed)  # 2) metrics, off the clock
            if not history.reached_target and history.train_loss[-1] < config.tol:
                history.target_iteration, history.target_seconds = step, elapsed
            if callback is not None:
                callback(step, config.max_iters, {"train_loss": history.train_loss[-1]})
    return history
