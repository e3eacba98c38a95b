"""A compressed language model is never silently broken: calibration text it generates itself
when no data is given, and its perplexity on held-out calibration text before and after.

`compress_checkpoint` calls `generated_data` once the model is loaded (a causal LM without
`data`, `generate` set: the text comes from `training.generated`) and `record_perplexity` once
the model is compressed (and again after fine-tuning).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from compressor.core.compress import check_finite
from compressor.core.inputs import input_limits
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.options import MethodOptions
from compressor.training.data import DataOptions
from compressor.training.generated import GENERATED, Generated, can_generate
from compressor.workflows.plan import PlanInfo

__all__ = ["WORSE", "generated_data", "measure_before", "record_perplexity"]

WORSE = 2.0
"""Perplexity after over before above which `compress` warns that the model is badly hurt."""

_BATCH = 8  # generated sequences per calibration batch


def generated_data(
    loaded: LoadedCheckpoint, aware: MethodOptions
) -> tuple[MethodOptions, Generated | None]:
    """`aware` with the model's generated text as its calibration data, when it has none,
    asks for it (`generate`), feeds a method that reads data (auto or whiten) and the model
    can generate; else `aware` unchanged and None."""
    from compressor.training.generated import generate_calibration

    wanted = aware.generate and aware.data is None and aware.method in ("auto", "whiten")
    if not wanted or aware.reference is not None or not can_generate(loaded.model):
        return aware, None
    for name, param in loaded.model.named_parameters():  # sampling from NaNs fails obscurely
        check_finite(name, param.detach())
    spec = GENERATED
    positions = input_limits(loaded.model).positions
    if positions is not None and positions < spec.length:
        spec = replace(spec, length=positions)  # never past the model's position table
    done = generate_calibration(loaded.model, loaded.weight_files, spec)
    data = DataOptions(done.path, max_length=spec.length, batch_size=_BATCH)
    return replace(aware, data=data), done


def measure_before(model: nn.Module, measured: PlanInfo) -> None:
    """The uncompressed model's perplexity on the held-out calibration batches (a causal LM's
    calibration holds some out: `plan.calibration_batches`) into `measured`."""
    from compressor.training.perplexity import batch_perplexity

    if measured.data is not None and measured.data.held_out:
        measured.perplexity_before = batch_perplexity(model, measured.data.held_out)


STAGES = {"after_finetune": "after fine-tuning", "after_quantize": "after quantization"}
"""How a warning names the later stages of `record_perplexity`."""


def record_perplexity(
    summary: dict,
    notices: list[str],
    model: nn.Module,
    measured: PlanInfo,
    stage: str = "after",  # or "after_finetune", "after_quantize"
    generated: Generated | None = None,
) -> None:
    """Put the perplexity of `model` on the held-out calibration batches (`stage`: after
    compression, after fine-tuning, or after quantization) beside the one measured before
    into `summary`; warn in `notices` when it is more than `WORSE` times the original's."""
    from compressor.training.perplexity import batch_perplexity

    data = measured.data
    if data is None or not data.held_out or measured.perplexity_before is None:
        return
    after = batch_perplexity(model, data.held_out)
    before = measured.perplexity_before
    record = summary.setdefault(
        "perplexity",
        {
            "text": "text the model generated" if generated is not None else "calibration text",
            "held_out_samples": sum(len(b["input_ids"]) for b in data.held_out),
            "before": round(before, 3),
        },
    )
    record[stage] = round(after, 3)
    if after > WORSE * before:
        source = "text it generated" if generated is not None else "the calibration data"
        when = STAGES.get(stage, "after compression")
        notices.append(
            f"perplexity {after:.1f} {when} against {before:.1f} before "
            f"({after / before:.1f}x) on held-out {source}: give `data` like the model's "
            "real use, raise `keep`, or fine-tune"
        )
