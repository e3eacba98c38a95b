"""Held-out quality of a model: its task loss (perplexity for LMs) and how close it stays to
the original (distillation loss, and embedding cosine for bare encoders).

Runs through an `accelerate.Accelerator`, so the same call evaluates on CPU, one GPU or a
shard per process under `accelerate launch` (per-batch sums are gathered with
`gather_for_metrics`, which drops the padding samples of the last uneven batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from compressor.core.tasks import IGNORE_INDEX, TaskSpec, is_regression, task_spec, token_mask
from compressor.errors import DlncError
from compressor.training.objectives import hidden_mse, kl_logits

__all__ = ["EvalResult", "HeldOut", "batch_loader", "cpu_launch", "evaluate"]

Batch = dict[str, torch.Tensor]
_FIELDS = (
    "task_sum",
    "task_n",
    "correct",
    "acc_n",
    "distill_sum",
    "distill_n",
    "cos_sum",
    "cos_n",
    "rows",
)


@dataclass
class EvalResult:
    """Held-out metrics; a metric that does not apply is None."""

    task: str | None  # causal_lm | masked_lm | classification | None (bare encoder)
    loss: float | None  # task loss: mean over predicted tokens (LMs) or samples
    perplexity: float | None  # exp(loss) for LMs (pseudo-perplexity for masked LMs)
    accuracy: float | None  # classification
    distill: float | None  # distillation loss against the teacher (KL on logits or hidden MSE)
    cosine: float | None  # bare encoders: mean cosine of mean-pooled embeddings vs the teacher
    samples: int

    @property
    def headline(self) -> float:
        """The number to compare runs by: the task loss, else the distillation loss."""
        return self.loss if self.loss is not None else self.distill

    def to_dict(self) -> dict:
        return asdict(self)


class _Batches(Dataset):
    """Premade batches as a dataset of one item each (sharded across processes by accelerate)."""

    def __init__(self, batches: Sequence[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.batches[i]


def _first(items: list[Batch]) -> Batch:
    return items[0]


def batch_loader(
    batches: Sequence[Batch] | Dataset, generator: torch.Generator | None = None
) -> DataLoader:
    """A DataLoader that yields premade batches (from `compressor.training.data.make_batches`)."""
    dataset = batches if isinstance(batches, Dataset) else _Batches(batches)
    return DataLoader(dataset, batch_size=1, collate_fn=_first, generator=generator)


def evaluate(
    model: nn.Module,
    batches: Sequence[Batch],
    teacher: nn.Module | None = None,
    *,
    temperature: float = 2.0,
    mask_token_id: int | None = None,
    seed: int = 0,
    accelerator=None,
) -> EvalResult:
    """Held-out metrics of `model` on `batches`; with `teacher`, also how far it is from it.

    Without an `accelerator` one is made and both models are placed by it. Masked LMs mask
    the same tokens on every call (generator seeded with `seed`).
    """
    if not batches:
        raise DlncError("no held-out batches to evaluate on")
    spec = task_spec(model, mask_token_id)
    first = batches[0]
    scored = spec.unscorable("labels" in first, "input_ids" in first) is None
    if not scored and teacher is None:
        raise DlncError(
            f"{spec.model_name} has no task head to score; give `teacher` to compare it "
            "with the original model"
        )
    if accelerator is None:
        accelerator = _default_accelerator()
        model = accelerator.prepare_model(model, evaluation_mode=True)
        if teacher is not None:
            teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    loader = accelerator.prepare_data_loader(batch_loader(batches))
    generator = torch.Generator().manual_seed(seed + accelerator.process_index)
    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for batch in loader:
            stats = _batch_stats(model, teacher, batch, spec, scored, temperature, generator)
            rows.append(accelerator.gather_for_metrics(stats[None]))
    model.train(was_training)
    sums = dict(zip(_FIELDS, torch.cat(rows).sum(0).tolist(), strict=True))
    return _result(spec if scored else TaskSpec(None), sums)


def _default_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=cpu_launch())


def cpu_launch() -> bool:
    """True for a multi-process launch (torchrun, `accelerate launch`) on a machine without
    CUDA: accelerate only sets up gloo data parallelism across CPU processes when told `cpu`."""
    import os

    world = max(int(os.environ.get(k, "1")) for k in ("WORLD_SIZE", "PMI_SIZE"))
    return world > 1 and not torch.cuda.is_available()


def _batch_stats(model, teacher, batch, spec: TaskSpec, scored: bool, temperature, generator):
    """One batch's sums (see `_FIELDS`) as a float64 vector, ready to gather."""
    if scored:
        batch = spec.prepare(batch, generator)
    inputs = spec.inputs(batch)
    out = model(**inputs)
    s = dict.fromkeys(_FIELDS, 0.0)
    s["rows"] = len(next(iter(inputs.values())))
    if scored:
        s.update(_task_sums(out.logits, batch, spec))
    if teacher is not None:
        s.update(_distill_sums(out, teacher(**inputs), batch, temperature))
    device = next(iter(inputs.values())).device
    return torch.tensor([s[f] for f in _FIELDS], dtype=torch.float64, device=device)


def _task_sums(logits: torch.Tensor, batch: Batch, spec: TaskSpec) -> dict[str, float]:
    """The summed task loss and its count (predicted tokens, or samples); a classifier's
    correct answers too."""
    total = float(spec.loss(logits, batch, reduction="sum"))
    logits, labels = spec.targets(logits, batch)
    if spec.task != "classification":
        return {"task_sum": total, "task_n": float((labels != IGNORE_INDEX).sum())}
    n = len(labels)
    if is_regression(logits, labels):
        return {"task_sum": total, "task_n": n}
    correct = float((logits.argmax(-1) == labels).sum())
    return {"task_sum": total, "task_n": n, "correct": correct, "acc_n": n}


def _distill_sums(s_out, t_out, batch: Batch, temperature: float) -> dict[str, float]:
    if getattr(s_out, "logits", None) is not None and getattr(t_out, "logits", None) is not None:
        logits = s_out.logits
        mask = token_mask(batch, logits) if logits.ndim == 3 else None
        n = float(mask.sum()) if mask is not None else len(logits)
        return {"distill_sum": float(kl_logits(logits, t_out.logits, mask, temperature)) * n,
                "distill_n": n}  # fmt: skip
    s_h, t_h = s_out.last_hidden_state.float(), t_out.last_hidden_state.float()
    mask = token_mask(batch, s_h)
    n = float(mask.sum())
    cos = F.cosine_similarity(_mean_pool(s_h, mask), _mean_pool(t_h, mask), dim=-1)
    return {
        "distill_sum": float(hidden_mse(s_h, t_h, mask)) * n,
        "distill_n": n,
        "cos_sum": float(cos.sum()),
        "cos_n": len(cos),
    }


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _result(spec: TaskSpec, s: dict[str, float]) -> EvalResult:
    task = spec.task
    loss = s["task_sum"] / s["task_n"] if task is not None and s["task_n"] else None
    has_distill = s["distill_n"] > 0
    return EvalResult(
        task=task,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)) if spec.is_lm and loss is not None else None,
        accuracy=s["correct"] / s["acc_n"] if s["acc_n"] else None,
        distill=s["distill_sum"] / s["distill_n"] if has_distill else None,
        cosine=s["cos_sum"] / s["cos_n"] if s["cos_n"] else None,
        samples=int(s["rows"]),
    )


class HeldOut:
    """Held-out metrics of the original (teacher), the student before and after training."""

    def __init__(self, accelerator, batches, teacher, objective, mask_token_id, seed) -> None:
        self.accelerator, self.batches, self.teacher = accelerator, batches, teacher
        self.kw = {"temperature": objective.temperature, "mask_token_id": mask_token_id,
                   "seed": seed, "accelerator": accelerator}  # fmt: skip

    def before(self, model: nn.Module) -> dict[str, EvalResult]:
        if not self.batches:
            return {}
        out = {}
        if self.teacher is not None:
            out["original"] = evaluate(self.teacher, self.batches, self.teacher, **self.kw)
        out["before"] = evaluate(model, self.batches, self.teacher, **self.kw)
        return out

    def after(self, model: nn.Module) -> dict[str, EvalResult]:
        if not self.batches:
            return {}
        return {"after": evaluate(model, self.batches, self.teacher, **self.kw)}
