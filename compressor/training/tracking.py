"""Experiment trackers for a fine-tuning run, through accelerate's own (`log_with`:
tensorboard, wandb, mlflow, ...): the names checked before any work, the run's settings
logged as the trackers' hyperparameters, each step's loss and learning rate, and the trackers
closed at the end. Their files go under the run's state folder (`LOGS`).

    accelerator = Accelerator(log_with=["tensorboard"], project_dir=state_dir / LOGS)
    start_trackers(accelerator, config)   # on the main process
    log_step(accelerator, step=1, loss=2.31, lr=1e-4)
    close_trackers(accelerator)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from compressor.errors import DlncError

__all__ = ["LOGS", "PROJECT", "check_trackers", "close_trackers", "log_step", "start_trackers"]

LOGS = "logs"
"""The trackers' folder under the run's state folder (accelerate's `project_dir`)."""
PROJECT = "finetune"
"""The trackers' project (run) name: tensorboard writes to `<state>/logs/finetune/`."""


def check_trackers(names: Iterable[str]) -> tuple[str, ...]:
    """`names` as a tuple, each one accelerate knows and whose package is installed; a
    `DlncError` naming `report_to` otherwise (checked before any work)."""
    names = tuple(names)
    if not names:
        return ()
    from accelerate import tracking
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType]
    installed = [str(t) for t in tracking._available_trackers]  # what `log_with` will start
    for name in names:
        if name not in known:
            choices = ", ".join(known)
            raise DlncError(f"`report_to`: unknown tracker {name!r}; accelerate's: {choices}")
        if name not in installed and (name != "all" or not installed):
            wanted = "any tracker" if name == "all" else name
            raise DlncError(f"`report_to` {name}: {wanted} is not installed (pip install {name})")
    return names


def start_trackers(accelerator, config: Any) -> None:
    """Start the accelerator's trackers (main process only) with the run's settings as
    hyperparameters: the scalar fields of `config`, the objective's parameters flattened."""
    values = {}
    for key, value in asdict(config).items():
        if isinstance(value, dict):
            values.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, bool | int | float | str):
            values[key] = value
    accelerator.init_trackers(PROJECT, config=values)


def log_step(accelerator, step: int, loss: float, lr: float) -> None:
    """One optimizer step's training loss and learning rate (main process only)."""
    accelerator.log({"loss": loss, "lr": lr}, step=step)


def close_trackers(accelerator) -> None:
    """Flush and close the trackers. Not `accelerator.end_training()`: that also tears the
    process group down, and the export still synchronises the processes."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()
