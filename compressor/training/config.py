"""Fine-tuning settings: `FinetuneConfig`, a recipe's `finetune` section as a checked dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.core.layers import check_depth
from compressor.errors import DlncError
from compressor.training.objectives import check_params, objective_names
from compressor.training.tracking import check_trackers

__all__ = ["DTYPES", "PRECISIONS", "SCHEDULE_FIELDS", "TEACHER_DTYPES", "FinetuneConfig"]

PRECISIONS = ("auto", "no", "fp16", "bf16")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}  # fmt: skip
"""The dtypes a model can be cast to by name (`auto`: as it is)."""
TEACHER_DTYPES = DTYPES
SCHEDULE_FIELDS = ("steps", "lr", "outer_lr_scale", "depth", "warmup", "grad_accum", "seed")
"""Fields a resumed run must share with the saved one, or it would not end where it would have."""


@dataclass
class FinetuneConfig:
    """How to fine-tune (a recipe's `finetune` section). Batch size and data live in the data
    options (`compressor.training.data.DataOptions`)."""

    steps: int = 200  # optimizer steps (each: grad_accum batches on every process)
    lr: float = 1e-4  # peak learning rate (inner factors and every other trained weight)
    outer_lr_scale: float = 1.0  # alpha: the chains' outer factors (up, down) train at alpha * lr
    depth: int | None = None  # deepen every chain to this depth L >= 2 first (None: as loaded)
    warmup: float = 0.05  # fraction of the steps spent in linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_accum: int = 1  # batches per optimizer step on each process
    clip: float | None = 1.0  # max gradient norm (None: no clipping)
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16 (auto: bf16/fp16 on GPU, no on CPU)
    teacher_dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on a bf16 GPU)
    objective: str = "distill"  # a registered objective: distill | task | mix
    # the objectives' parameters by name (temperature, mix_weight, ...; defaults filled in)
    objective_params: dict[str, float] = field(default_factory=dict)
    trainable: str = "all"  # all | factors (train only the factorized chains)
    save_every: int = 0  # checkpoint the training state every K steps (0: only on interrupt)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    shuffle: bool = True  # reshuffle the batches every epoch (seeded)
    seed: int = 0  # seeds the shuffle, dropout and masking
    # experiment trackers each step's loss and lr go to (accelerate's `log_with`: tensorboard,
    # wandb, mlflow, ...), writing under the run's state folder
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _at_least("steps", self.steps, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("save_every", self.save_every, 0)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if self.depth is not None:
            check_depth(self.depth)
        for name in ("lr", "outer_lr_scale"):
            if not getattr(self, name) > 0:
                raise DlncError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise DlncError(f"`warmup` must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise DlncError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        if self.clip is not None and not self.clip > 0:
            raise DlncError(f"`clip` must be > 0 (or None), got {self.clip}")
        _one_of("mixed_precision", self.mixed_precision, PRECISIONS)
        _one_of("teacher_dtype", self.teacher_dtype, tuple(TEACHER_DTYPES))
        _one_of("objective", self.objective, objective_names())
        self.objective_params = check_params(self.objective_params)
        _one_of("trainable", self.trainable, ("all", "factors"))
        self.report_to = check_trackers(self.report_to)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise DlncError(f"`{name}` must be >= {low}, got {value}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DlncError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}")
