"""Deep linear network compression on matrix recovery (docs/method.md section 2).

problems.py   targets, data, losses and errors for factorization / completion / sensing
networks.py   the wide DLN (scaled orthogonal init) and the compressed one (spectral init)
train.py      full-batch GD with closed-form chain gradients and a logged history
experiment.py both networks on the same problem: `run_dln_benchmark`
mlp.py        the nonlinear experiment on scikit-learn's digits
plots.py      recovery error vs iterations and seconds (matplotlib, imported lazily)
"""

from compressor.dln.experiment import DLNBenchConfig, DLNBenchResult, run_dln_benchmark
from compressor.dln.networks import DeepLinearNetwork, compressed_network, wide_network
from compressor.dln.problems import TASKS, ProblemConfig, make_problem
from compressor.dln.train import History, TrainConfig, train

__all__ = [
    "TASKS",
    "DLNBenchConfig",
    "DLNBenchResult",
    "DeepLinearNetwork",
    "History",
    "ProblemConfig",
    "TrainConfig",
    "compressed_network",
    "make_problem",
    "run_dln_benchmark",
    "train",
    "wide_network",
]
