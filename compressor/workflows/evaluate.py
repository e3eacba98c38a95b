"""`eval` as a workflow: the held-out metrics of a model (and of the original it came from)."""

from __future__ import annotations

import os

from compressor.training.data import DataOptions, load_samples, load_tokenizer, make_batches
from compressor.training.evaluate import EvalResult, evaluate
from compressor.workflows.finetune import load_model

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(
    path: str | os.PathLike, data: DataOptions, teacher: str | os.PathLike | None = None
) -> dict[str, EvalResult]:
    """`{"original": ..., "model": ...}`: the held-out metrics of the model at `path` on
    `data` and, with `teacher`, those of the original and how far the model is from it."""
    samples = load_samples(data.path, data.text_field, data.label_field, data.samples, data.seed)
    tok = load_tokenizer(path, data.tokenizer) if samples.is_text else None
    batches = make_batches(samples, tok, data.max_length, data.batch_size)
    original = load_model(teacher) if teacher is not None else None
    mask_id = getattr(tok, "mask_token_id", None)
    metrics = {}
    if original is not None:
        metrics["original"] = evaluate(original, batches, original, mask_token_id=mask_id,
                                       seed=data.seed)  # fmt: skip
    metrics["model"] = evaluate(load_model(path), batches, original, mask_token_id=mask_id,
                                seed=data.seed)  # fmt: skip
    return metrics
