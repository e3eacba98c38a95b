"""The paper's figure: recovery error of both networks against iterations and against seconds.

matplotlib is imported inside the function (Agg backend), so `import compressor` stays light.
"""

from __future__ import annotations

from pathlib import Path

from compressor.dln.experiment import DLNBenchResult

__all__ = ["plot_recovery"]


def plot_recovery(result: DLNBenchResult, path: str | Path, title: str = "") -> Path:
    """Two log-scale panels, error vs iteration and error vs wall time; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, history in (("wide", result.wide), ("compressed", result.compressed)):
        axes[0].semilogy(history.iterations, history.recovery_error, label=name)
        axes[1].semilogy(history.seconds, history.recovery_error, label=name)
    for ax, xlabel in zip(axes, ("iteration", "seconds (training steps only)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("recovery error ||W - M||_F / ||M||_F")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
