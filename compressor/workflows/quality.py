"""A compressed language model is never silently broken: calibration text it generates itself
(or, for a text encoder, random word pieces) when no data is given, and its perplexity on
held-out calibration text before and after.

`compress_checkpoint` calls `generated_data` once the model is loaded (no `data`, `generate`
set: the inputs come from `training.generated`) and `record_perplexity` once the model is
compressed (and again after fine-tuning).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from compressor.core.compress import check_finite
from compressor.core.inputs import input_limits
from compressor.errors import DlncError, first_line
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.options import MethodOptions
from compressor.training.data import DataOptions
from compressor.training.generated import (
    GENERATED,
    RANDOM_PIECES,
    Generated,
    GenerationSpec,
    can_generate,
    can_sample_pieces,
)
from compressor.workflows.plan import PlanInfo

__all__ = ["WORSE", "generated_data", "measure_before", "record_perplexity"]

WORSE = 2.0
"""Perplexity after over before above which `compress` warns that the model is badly hurt."""

_BATCH = 8  # generated sequences per calibration batch


def generated_data(
    loaded: LoadedCheckpoint, aware: MethodOptions
) -> tuple[MethodOptions, Generated | None]:
    """`aware` with calibration data of the model's own making, when it has none, asks for it
    (`generate`) and feeds a method that reads data (auto or whiten): text a causal LM
    generates, or random word pieces framed by a text encoder's tokenizer (`aware.tokenizer`,
    else the model folder's; none there: a notice, and the weights alone; a named one that
    cannot serve: an error). Else `aware` unchanged and None."""
    from compressor.training.data import load_tokenizer
    from compressor.training.generated import generate_calibration, random_calibration

    wanted = aware.generate and aware.data is None and aware.method in ("auto", "whiten")
    if not wanted or aware.reference is not None:
        return aware, None
    model, files = loaded.model, loaded.weight_files
    if can_generate(model):
        for name, param in model.named_parameters():  # sampling from NaNs fails obscurely
            check_finite(name, param.detach())
        spec = _fitted(model, GENERATED)
        done = generate_calibration(model, files, spec)
    elif can_sample_pieces(model):
        spec = _fitted(model, RANDOM_PIECES)
        try:
            tokenizer = load_tokenizer(loaded.source, aware.tokenizer)
            done = random_calibration(model, tokenizer, files, spec)
        except DlncError as e:  # no tokenizer, none of its tokens plain, no cache
            if aware.tokenizer is not None:
                raise  # the one named cannot serve: the user's error, not a fallback
            loaded.notices.append(
                f"no data, and no random word pieces to calibrate on ({first_line(e)}): ranks "
                "and factors from the weights alone, which loses far more (give `data`)"
            )
            return aware, None
        # No error-correcting refit on them: fitting each layer's outputs on meaningless
        # inputs loses what the one-shot fit keeps (all-MiniLM-L6-v2, keep 0.5, three seeds:
        # cosine 0.59-0.61 one-shot against 0.42-0.51 refit; docs/benchmarks.md, session 18).
        aware = replace(aware, correct=False)
    else:
        return aware, None
    data = DataOptions(done.path, max_length=spec.length, batch_size=_BATCH)
    return replace(aware, data=data), done


def _fitted(model: nn.Module, spec: GenerationSpec) -> GenerationSpec:
    """`spec` cut to the model's position table (never past it)."""
    positions = input_limits(model).positions
    if positions is None or positions >= spec.length:
        return spec
    return replace(spec, length=positions)


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
