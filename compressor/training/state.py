"""The state of a fine-tuning run apart from its settings: resumable checkpoints, stop requests
(Ctrl-C, SIGTERM) and how a run ends early.

Checkpoints are written to a temp folder and renamed when complete, so none is ever partial.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from compressor.errors import DlncError, Interrupted
from compressor.io.files import write_error
from compressor.training.config import SCHEDULE_FIELDS, FinetuneConfig
from compressor.training.evaluate import EvalResult

__all__ = [
    "FinetuneInterrupted",
    "NonFiniteLoss",
    "RunState",
    "latest_checkpoint",
    "stop_requests",
]


class NonFiniteLoss(DlncError):
    """The loss became NaN/Inf; the run stopped before the update."""


class FinetuneInterrupted(Interrupted):
    """Ctrl-C / SIGTERM: the run stopped at a step boundary and saved a resumable state."""


class RunState:
    """Where checkpoints go and what travels with them besides accelerate's state."""

    def __init__(self, state_dir: Path | None) -> None:
        self.dir = state_dir
        self.step = 0
        self.resumed_from = 0
        self.losses: list[float] = []  # each step's training loss
        self.lrs: list[float | None] = []  # each step's learning rate (None: not recorded)
        self.evals: dict[str, EvalResult] = {}
        self.last_saved: Path | None = None

    def history(self) -> list[dict]:
        """Every step so far: `{"step", "loss", "lr"}` (report.json's loss history)."""
        return [
            {"step": i, "loss": loss, "lr": lr}
            for i, (loss, lr) in enumerate(zip(self.losses, self.lrs, strict=True), start=1)
        ]

    def restore(self, accelerator, config: FinetuneConfig) -> None:
        found = latest_checkpoint(self.dir)
        if found is None:
            raise DlncError(f"{self.dir}: no checkpoint to resume from")
        saved = json.loads((found / "trainer_state.json").read_text())
        for name in SCHEDULE_FIELDS:
            if saved["config"].get(name) != getattr(config, name):
                raise DlncError(
                    f"cannot resume: `{name}` was {saved['config'].get(name)} in the saved run, "
                    f"now {getattr(config, name)}"
                )
        accelerator.load_state(str(found))
        self.step = self.resumed_from = saved["step"]
        self.losses = saved["losses"]
        self.lrs = saved.get("lrs", [None] * len(self.losses))  # saved before lrs were kept
        self.evals = {k: EvalResult(**v) for k, v in saved["evals"].items()}
        self.last_saved = found

    def save(self, accelerator, config: FinetuneConfig) -> Path:
        """Write checkpoint-<step> through a temp folder renamed when every process is done;
        a failed write (a full disk) removes the temp folder and is a one-line error."""
        from safetensors import SafetensorError

        tmp = self.dir / f".checkpoint-{self.step:07d}.tmp"
        try:
            return self._save(accelerator, config, tmp)
        except (OSError, SafetensorError) as e:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                with contextlib.suppress(OSError):
                    self.dir.rmdir()  # only when this run made it and nothing else is in it
            raise write_error(self.dir, e) from e

    def _save(self, accelerator, config: FinetuneConfig, tmp: Path) -> Path:
        final = self.dir / f"checkpoint-{self.step:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            extra = {
                "step": self.step,
                "losses": self.losses,
                "lrs": self.lrs,
                "evals": {k: v.to_dict() for k, v in self.evals.items()},
                "config": asdict(config),
            }
            (tmp / "trainer_state.json").write_text(json.dumps(extra, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in _checkpoints(self.dir)[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_saved = final
        return final


def _checkpoints(state_dir: Path | None) -> list[Path]:
    if state_dir is None or not state_dir.is_dir():
        return []
    found = [p for p in state_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(state_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete checkpoint folder under `state_dir`, or None."""
    found = _checkpoints(Path(state_dir) if state_dir is not None else None)
    return found[-1] if found else None


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """Ctrl-C / SIGTERM set an event the loop checks at step boundaries; a second Ctrl-C
    interrupts at once. Handlers are only installed from the main thread."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
