"""Recovery fine-tuning of a compressed model: one `accelerate` loop for CPU, one GPU or many.

    result = finetune(student, batches, teacher=original, config=FinetuneConfig(steps=200),
                      eval_batches=held_out, state_dir="run-state")

The loop follows the accelerate examples: `prepare`, `accumulate`, `backward`, clipping on
the synchronising step, warm-up + cosine schedule, `save_state`/`load_state` to resume. The
chains can be deepened to depth L and their outer factors trained at `outer_lr_scale` times
the learning rate (the discrepant learning rate of docs/method.md 2-3); export collapses them back.
Safety: a NaN/Inf loss stops every process before the update (`NonFiniteLoss`); Ctrl-C or
SIGTERM stops at the next step boundary with a resumable checkpoint (`FinetuneInterrupted`).
Checkpoints are written to a temp folder and renamed when complete, so none is ever partial.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from compressor.core.layers import FactorizedLinear
from compressor.core.progress import ProgressFn
from compressor.core.surgery import deepen_, factorized_layers
from compressor.errors import DlncError
from compressor.training.config import TEACHER_DTYPES, FinetuneConfig
from compressor.training.evaluate import EvalResult, HeldOut, batch_loader, cpu_launch
from compressor.training.objectives import build_objective
from compressor.training.state import (
    FinetuneInterrupted,
    NonFiniteLoss,
    RunState,
    latest_checkpoint,
    stop_requests,
)
from compressor.training.tracking import LOGS, close_trackers, log_step, start_trackers

__all__ = [
    "FinetuneConfig",
    "FinetuneInterrupted",
    "FinetuneResult",
    "NonFiniteLoss",
    "finetune",
    "latest_checkpoint",
]

Batch = dict[str, torch.Tensor]


@dataclass
class FinetuneResult:
    """The trained student and what happened."""

    model: nn.Module  # unwrapped; full weights on the main process
    steps: int
    objective: str  # what was optimised, in words
    losses: list[float]  # training loss per step (over the whole run, resumes included)
    evals: dict[str, EvalResult] = field(default_factory=dict)  # original / before / after
    seconds: float = 0.0  # wall time of the steps run by this call
    steps_per_s: float = 0.0
    resumed_from: int = 0  # the step this call continued from (0: a fresh run)
    is_main_process: bool = True
    mixed_precision: str = "no"
    num_processes: int = 1
    kept_start: bool = False  # training made the held-out loss worse: the start was returned
    history: list[dict] = field(default_factory=list)  # every step's {step, loss, lr}
    logs: str | None = None  # where the experiment trackers wrote (`report_to`)

    def report(self) -> dict:
        """The `finetune` section of report.json."""
        return {
            "steps": self.steps,
            "objective": self.objective,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": self.losses[-1] if self.losses else None,
            "seconds": round(self.seconds, 2),
            "steps_per_s": round(self.steps_per_s, 3),
            "resumed_from": self.resumed_from,
            "mixed_precision": self.mixed_precision,
            "num_processes": self.num_processes,
            "kept_start": self.kept_start,
            "eval": {k: v.to_dict() for k, v in self.evals.items()},
            "logs": self.logs,
            "history": self.history,
        }


class _Shuffled(Dataset):
    """The batches in a seeded order that changes with the epoch (same order on every process,
    each of which reads its own shard of it)."""

    def __init__(self, batches: Sequence[Batch], seed: int, shuffle: bool) -> None:
        self.batches, self.seed, self.shuffle = batches, seed, shuffle
        self.order = list(range(len(batches)))

    def use_epoch(self, epoch: int) -> None:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.order = torch.randperm(len(self.batches), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[self.order[i]]


def finetune(
    student: nn.Module,
    batches: Sequence[Batch],
    *,
    teacher: nn.Module | None = None,
    config: FinetuneConfig | None = None,
    eval_batches: Sequence[Batch] | None = None,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    mask_token_id: int | None = None,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Fine-tune `student` (a compressed model) on `batches`, distilling from `teacher` and/or
    on its task; with `eval_batches`, held-out metrics of the original, before and after.

    `state_dir` receives `checkpoint-<step>/` folders (every `save_every` steps and on
    interrupt); `resume=True` continues from the newest one. Only the main process writes.
    The teacher is moved to the training device (and `teacher_dtype`) in place, and frozen in
    eval mode while training; its `requires_grad` flags and mode are given back at the end.
    """
    from accelerate.utils import set_seed

    config = config or FinetuneConfig()
    _check_run(batches, config, state_dir, resume)
    logs = Path(state_dir) / LOGS if config.report_to else None
    accelerator = _accelerator(config, logs)
    set_seed(config.seed)
    if config.depth is not None:
        deepen_(student, config.depth)
    objective = build_objective(
        config.objective, student, teacher, mask_token_id=mask_token_id,
        has_labels="labels" in batches[0], **config.objective_params,
    )  # fmt: skip
    lent = _Lent(teacher) if teacher is not None else None
    teacher = _place_teacher(teacher, accelerator, config) if teacher is not None else None
    template = _fsdp_template(student, accelerator)
    student.train()
    _freeze(student, config.trainable)
    optimizer = torch.optim.AdamW(_param_groups(student, config), lr=config.lr,
                                  weight_decay=config.weight_decay)  # fmt: skip
    scheduler = _schedule(optimizer, config, accelerator.num_processes)
    data = _Shuffled(batches, config.seed, config.shuffle)
    # its own generator: iterating a DataLoader draws a seed, which must not move the global
    # RNG (dropout, masking) differently in a resumed run than in an uninterrupted one
    loader = batch_loader(data, generator=torch.Generator().manual_seed(config.seed))
    model, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    state = RunState(Path(state_dir) if state_dir is not None else None)
    if resume:
        state.restore(accelerator, config)
    evals = dict(state.evals)
    ev = HeldOut(accelerator, eval_batches, teacher, objective, mask_token_id, config.seed)
    if not state.evals:
        evals.update(ev.before(model))
        state.evals = evals
    start = _snapshot(accelerator, model) if "before" in evals and not resume else None
    run = _Loop(accelerator, model, optimizer, scheduler, loader, data, objective, teacher,
                config, state, progress)  # fmt: skip
    seconds = run.train()
    evals.update(ev.after(model))
    kept_start = _keep_the_better(accelerator, model, start, evals)
    if lent is not None:
        lent.give_back()
    done = config.steps - state.resumed_from
    return FinetuneResult(
        model=_final_model(accelerator, model, template),
        steps=config.steps,
        objective=objective.describe(),
        losses=state.losses,
        evals=evals,
        seconds=seconds,
        steps_per_s=done / seconds if seconds > 0 else 0.0,
        resumed_from=state.resumed_from,
        is_main_process=accelerator.is_main_process,
        mixed_precision=accelerator.mixed_precision,
        num_processes=accelerator.num_processes,
        kept_start=kept_start,
        history=state.history(),
        logs=str(logs) if logs is not None else None,
    )


def _check_run(batches, config: FinetuneConfig, state_dir, resume: bool) -> None:
    if not batches:
        raise DlncError("no training batches")
    if resume and state_dir is None:
        raise DlncError("`resume` needs the `state_dir` of the interrupted run")
    if config.report_to and state_dir is None:
        raise DlncError("`report_to` needs a `state_dir`: the trackers write under it")


def _snapshot(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the student's weights before training (the fallback of the best rule)."""
    state = accelerator.unwrap_model(model).state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _keep_the_better(accelerator, model: nn.Module, start, evals: dict) -> bool:
    """Never return a model worse than its start on held-out data: when the held-out
    headline (task loss, else distillation loss) got worse, restore the starting weights."""
    if start is None or "after" not in evals or evals["after"].headline is None:
        return False
    if not evals["after"].headline > evals["before"].headline:
        return False
    accelerator.unwrap_model(model).load_state_dict(start)
    evals["trained"], evals["after"] = evals["after"], evals["before"]
    return True


def _accelerator(config: FinetuneConfig, logs: Path | None):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    precision = config.mixed_precision
    if precision == "auto":
        precision = _auto_precision()
    accumulation = GradientAccumulationPlugin(
        num_steps=config.grad_accum, sync_with_dataloader=False
    )  # the step count, not the epoch end, decides when to update: resumes stay exact
    accelerator = Accelerator(
        mixed_precision=precision, gradient_accumulation_plugin=accumulation, cpu=cpu_launch(),
        log_with=list(config.report_to) or None, project_dir=logs,
    )  # fmt: skip
    if config.report_to:
        start_trackers(accelerator, config)
    return accelerator


def _auto_precision() -> str | None:
    """bf16 on a GPU that has it, fp16 on other GPUs, none on CPU; a launcher's choice wins."""
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class _Lent:
    """A teacher's `requires_grad` flags and training mode, to give back after training (a
    caller who distils several students from one original must not find it frozen)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher, self.training = teacher, teacher.training
        self.flags = [(p, p.requires_grad) for p in teacher.parameters()]

    def give_back(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.teacher.train(self.training)


def _place_teacher(teacher: nn.Module, accelerator, config: FinetuneConfig) -> nn.Module:
    """The teacher is frozen and moved by hand, not `prepare`d: prepared models are written
    into every checkpoint, and a frozen copy of the original has no place there."""
    dtype = TEACHER_DTYPES[config.teacher_dtype]
    if dtype is None and accelerator.device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16  # safe: bf16 keeps float32's range; used for inference only
    teacher.requires_grad_(False).eval()
    return teacher.to(device=accelerator.device, dtype=dtype)


def _fsdp_template(student: nn.Module, accelerator) -> nn.Module | None:
    """Under FSDP the prepared model holds shards: keep a CPU copy to load the full weights into."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    import copy

    return copy.deepcopy(student).cpu()


def _final_model(accelerator, model: nn.Module, template: nn.Module | None) -> nn.Module:
    accelerator.wait_for_everyone()
    if template is None:
        return accelerator.unwrap_model(model).eval()
    state = accelerator.get_state_dict(model)  # gathers the full weights on the main process
    if accelerator.is_main_process:
        template.load_state_dict(state)
    return template.eval()


def _freeze(student: nn.Module, trainable: str) -> None:
    if trainable == "factors":
        student.requires_grad_(False)
        for layer in factorized_layers(student).values():
            layer.requires_grad_(True)
    if not any(p.requires_grad for p in student.parameters()):
        raise DlncError("nothing to train: the model has no trainable (factorized) weights")


def _param_groups(student: nn.Module, config: FinetuneConfig) -> list[dict]:
    """Outer factors (up, down) at outer_lr_scale * lr; inner factors and the rest at lr."""
    outer = set()
    for layer in student.modules():
        if isinstance(layer, FactorizedLinear):
            outer.update(id(p) for p in (*layer.up.parameters(), *layer.down.parameters()))
    trained = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if id(p) in outer], "lr": config.lr * config.outer_lr_scale},
        {"params": [p for p in trained if id(p) not in outer], "lr": config.lr},
    ]
    return [g for g in groups if g["params"]]


def _schedule(optimizer, config: FinetuneConfig, num_processes: int):
    """Linear warm-up then cosine decay to 0. accelerate steps a prepared scheduler once per
    process on every optimizer step, so the schedule is laid out in those units."""
    total = config.steps * num_processes
    warm = int(config.warmup * total)

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm  # 1) linear warm-up
        progress = (i - warm) / max(total - warm, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 2) cosine decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Loop:
    """The training loop proper; `train()` returns the seconds it ran."""

    def __init__(self, accelerator, model, optimizer, scheduler, loader, data, objective,
                 teacher, config, state, progress) -> None:  # fmt: skip
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.scheduler, self.loader, self.data = scheduler, loader, data
        self.objective, self.teacher, self.config = objective, teacher, config
        self.state, self.progress = state, progress
        self.lr = 0.0  # the learning rate of the last update

    def train(self) -> float:
        start = time.perf_counter()
        try:
            with stop_requests() as stop:
                while self.state.step < self.config.steps:
                    self._epoch(stop, start)
        finally:
            close_trackers(self.accelerator)  # flushed, whether the run ended or stopped
        self.accelerator.wait_for_everyone()
        return time.perf_counter() - start

    def _epoch(self, stop: threading.Event, start: float) -> None:
        """Batches from where the step count says this epoch is, until the epoch or run ends."""
        acc, state = self.accelerator, self.state
        per_epoch = len(self.loader)
        epoch, skip = divmod(state.step * self.config.grad_accum, per_epoch)
        self.data.use_epoch(epoch)
        loader = acc.skip_first_batches(self.loader, skip) if skip else self.loader
        losses: list[float] = []
        for batch in loader:
            with acc.accumulate(self.model):
                losses.append(self._micro_step(batch))
            if not acc.sync_gradients:
                continue
            state.step += 1
            state.losses.append(self._mean_over_processes(losses))
            state.lrs.append(self.lr)
            losses = []
            if self.config.report_to:
                log_step(acc, state.step, state.losses[-1], self.lr)
            self._report(start)
            if self._any_process(stop.is_set()):
                self._interrupt()
            if self.config.save_every and state.step % self.config.save_every == 0:
                state.save(acc, self.config)
            if state.step >= self.config.steps:
                return

    def _micro_step(self, batch: Batch) -> float:
        acc = self.accelerator
        parts = self.objective(self.model, batch, self.teacher)
        if self._any_process(not torch.isfinite(parts.loss).item()):
            self._diverged(parts.parts)
        acc.backward(parts.loss)
        if acc.sync_gradients and self.config.clip is not None:
            acc.clip_grad_norm_(self.model.parameters(), self.config.clip)
        if acc.sync_gradients:
            self.lr = float(self.optimizer.param_groups[-1]["lr"])  # this update's
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return float(parts.loss.detach())

    def _any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (one small all-reduce)."""
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _mean_over_processes(self, losses: list[float]) -> float:
        t = torch.tensor([sum(losses) / len(losses)], device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def _report(self, start: float) -> None:
        if self.progress is None or not self.accelerator.is_main_process:
            return
        state, elapsed = self.state, time.perf_counter() - start
        rate = (state.step - state.resumed_from) / elapsed if elapsed > 0 else 0.0
        left = self.config.steps - state.step
        self.progress(
            "finetune", state.step, self.config.steps, loss=state.losses[-1],
            lr=state.lrs[-1], steps_per_s=rate,
            eta_s=left / rate if rate > 0 else float("inf"), elapsed_s=elapsed,
        )  # fmt: skip

    def _diverged(self, parts: dict[str, float]) -> None:
        state = self.state
        kept = state.last_saved or latest_checkpoint(state.dir)
        where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was saved"
        terms = ", ".join(f"{k}={v}" for k, v in parts.items())
        raise NonFiniteLoss(
            f"the loss became NaN/Inf at step {state.step + 1} ({terms}); stopped before the "
            f"update, {where}; try a lower `lr` or check the data"
        )

    def _interrupt(self) -> None:
        state = self.state
        if state.dir is None:
            raise KeyboardInterrupt
        saved = state.save(self.accelerator, self.config)
        raise FinetuneInterrupted(
            f"interrupted after step {state.step}/{self.config.steps}; state saved to {saved}; "
            "run again with `resume` to continue"
        )
