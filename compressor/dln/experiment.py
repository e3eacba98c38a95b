"""Wide vs compressed DLN on the same recovery problem: the paper's experiment as one call."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.dln.networks import DeepLinearNetwork, compressed_network, wide_network
from compressor.dln.problems import Problem, ProblemConfig, make_problem
from compressor.dln.train import History, ProgressCallback, TrainConfig, train
from compressor.errors import DlncError

__all__ = [
    "DLNBenchConfig",
    "DLNBenchResult",
    "build_networks",
    "resolve_device",
    "run_dln_benchmark",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class DLNBenchConfig:
    """One benchmark: a problem, two networks of the same depth, GD settings."""

    problem: ProblemConfig = field(default_factory=ProblemConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    depth: int = 3  # number of layers L of both networks
    eps: float = 1e-2  # init scale of both networks
    alpha: float = 5.0  # discrepant lr: the compressed network's outer layers step alpha * eta
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (a GPU if there is one)
    dtype: str = "float64"  # float64 | float32

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise DlncError(f"`depth` must be >= 2, got {self.depth}")
        if not self.eps > 0:
            raise DlncError(f"`eps` must be > 0, got {self.eps}")
        if not self.alpha > 0:
            raise DlncError(f"`alpha` must be > 0, got {self.alpha}")
        if self.dtype not in DTYPES:
            raise DlncError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class DLNBenchResult:
    """Histories of both runs and the speedups of the compressed one."""

    wide: History
    compressed: History
    wide_parameters: int
    compressed_parameters: int

    @property
    def speedup_iterations(self) -> float:
        return self.wide.summary()["iterations"] / max(self.compressed.summary()["iterations"], 1)

    @property
    def speedup_seconds(self) -> float:
        return self.wide.summary()["seconds"] / max(self.compressed.summary()["seconds"], 1e-12)

    def compressed_ahead_from(self) -> int | None:
        """First logged iteration from which the compressed network's recovery error stays at
        or below the wide one's at every iteration both logged (None if it never does)."""
        pairs = zip(self.wide.recovery_error, self.compressed.recovery_error, strict=False)
        ahead = [c <= w for w, c in pairs]
        if not ahead or not ahead[-1]:
            return None
        first = len(ahead) - ahead[::-1].index(False) if False in ahead else 0
        return self.compressed.iterations[first]

    def to_dict(self) -> dict:
        """The JSON shape of `dlnc bench dln --json`."""
        wide = {**self.wide.summary(), "parameters": self.wide_parameters}
        compressed = {**self.compressed.summary(), "parameters": self.compressed_parameters}
        return {
            "wide": wide,
            "compressed": compressed,
            "speedup_iterations": self.speedup_iterations,
            "speedup_seconds": self.speedup_seconds,
            "compressed_ahead_from": self.compressed_ahead_from(),
        }


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first GPU if torch sees one, else the CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DlncError(f"`device` must be cpu, cuda, cuda:N or auto, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DlncError(f"`device` is {name!r} but torch sees no GPU; use --device cpu")
    return device


def build_networks(
    config: DLNBenchConfig, problem: Problem
) -> tuple[DeepLinearNetwork, DeepLinearNetwork]:
    """The wide network (width d) and the compressed one (width 2r), on the problem's device."""
    d, r = config.problem.d, config.problem.r
    generator = torch.Generator().manual_seed(config.problem.seed + 1)
    wide = wide_network(d, config.depth, config.eps, generator, problem.target.dtype)
    wide.weights = [w.to(problem.target.device) for w in wide.weights]
    surrogate = problem.surrogate()
    compressed = compressed_network(surrogate, 2 * r, config.depth, config.eps, config.alpha)
    return wide, compressed


def run_dln_benchmark(
    config: DLNBenchConfig,
    on_wide: ProgressCallback | None = None,
    on_compressed: ProgressCallback | None = None,
) -> DLNBenchResult:
    """Train both networks on the same data; progress goes to the optional callbacks."""
    device = resolve_device(config.device)
    problem = make_problem(config.problem, DTYPES[config.dtype], device)
    wide, compressed = build_networks(config, problem)
    return DLNBenchResult(
        wide=train(wide, problem, config.train, on_wide),
        compressed=train(compressed, problem, config.train, on_compressed),
        wide_parameters=wide.num_parameters(),
        compressed_parameters=compressed.num_parameters(),
    )
