"""The progress callback: how long-running library calls report, since the library never prints."""

from __future__ import annotations

from typing import Protocol

__all__ = ["ProgressFn", "report"]


class ProgressFn(Protocol):
    """progress(stage, done, total, **metrics): called as work advances.

    `stage` names the work ("spectra", "calibrate", "finetune"), `done` of `total` units are
    finished, and `metrics` carry numbers worth showing (fine-tuning: loss, lr, steps_per_s,
    eta_s, elapsed_s).
    """

    def __call__(self, stage: str, done: int, total: int, /, **metrics: float) -> None: ...


def report(
    progress: ProgressFn | None, stage: str, done: int, total: int, **metrics: float
) -> None:
    """Call `progress` if there is one."""
    if progress is not None:
        progress(stage, done, total, **metrics)
