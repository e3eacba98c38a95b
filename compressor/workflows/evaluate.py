"""`eval` as a workflow: the held-out metrics of a model (and of the original it came from)."""

from __future__ import annotations

import os

from compressor.training.data import DataOptions, load_data
from compressor.training.evaluate import EvalResult, evaluate
from compressor.workflows.finetune import check_teacher, load_model

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    path: str | os.PathLike,
    data: DataOptions,
    teacher: str | os.PathLike | None = None,
    notices: list[str] | None = None,
) -> dict[str, EvalResult]:
    """`{"original": ..., "model": ...}`: the held-out metrics of the model at `path` on
    `data` and, with `teacher`, those of the original and how far the model is from it.
    What reading the data noticed (samples cut to the model's positions) goes to `notices`."""
    model = load_model(path)
    original = load_model(teacher) if teacher is not None else None
    if original is not None:
        check_teacher(model, original, teacher)
    batches = load_data(data, path, model=model)
    if notices is not None:
        notices.extend(batches.notices)
    mask_id = batches.mask_token_id
    metrics = {}
    if original is not None:
        metrics["original"] = evaluate(original, batches.train, original, mask_token_id=mask_id,
                                       seed=data.seed)  # fmt: skip
    metrics["model"] = evaluate(model, batches.train, original, mask_token_id=mask_id,
                                seed=data.seed)  # fmt: skip
    return metrics
