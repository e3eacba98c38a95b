"""From folders on disk to a fine-tuned export: what `dlnc finetune` and
`dlnc compress --finetune-steps` run around the training loop of `compressor.training.loop`.

    options = FinetuneOptions(data=DataOptions("train.txt"), config=FinetuneConfig(steps=300))
    run = finetune_checkpoint("model-dlnc", "model-dlnc-ft", teacher="model", options=options)

Data comes from `compressor.training.data`; the held-out part is `eval_data`, or the last
`eval_fraction` of the samples. Under `accelerate launch` every process runs this; only the
main process exports (atomically, through `compressor.io.export.export`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compressor.core.progress import ProgressFn
from compressor.core.surgery import is_quantized
from compressor.errors import DlncError
from compressor.io.export import check_output_dir, export
from compressor.io.load import load_pretrained
from compressor.io.section import dlnc_version, is_export
from compressor.options import FinetuneOptions
from compressor.training.data import load_data
from compressor.training.loop import FinetuneResult, finetune

__all__ = [
    "RecoveryRun",
    "check_teacher",
    "finetune_checkpoint",
    "finetune_compressed",
    "load_model",
    "recover",
    "teacher_copy",
]


@dataclass
class RecoveryRun:
    """A finished fine-tuning run and where it was written (main process only)."""

    out_dir: Path | None
    report: dict
    result: FinetuneResult
    notices: list[str] = field(default_factory=list)  # what the user should be told


def load_model(path: str | os.PathLike) -> nn.Module:
    """A dlnc export (with its factorized layers) or an ordinary checkpoint folder, given as
    a path or as a Hub name in the local cache (what finetune, eval, speed and onnx read)."""
    from compressor.io.checkpoint import load_checkpoint, resolve_model

    folder = resolve_model(path)
    if is_export(folder):
        return load_pretrained(folder)
    loaded = load_checkpoint(folder)
    if loaded.tensor_mode:
        raise DlncError(f"{folder}: no known architecture; this needs a runnable model")
    return loaded.model


def check_teacher(model: nn.Module, teacher: nn.Module, where: str | os.PathLike) -> None:
    """A `DlncError` before any work when the teacher at `where` reads other token ids than
    `model` (another vocabulary size: they are compared token by token), or covers fewer
    positions (the samples are cut to the model's)."""
    from compressor.core.inputs import input_limits

    ours, theirs = input_limits(model), input_limits(teacher)
    hint = "give the original the model was compressed from"
    if None not in (ours.vocab, theirs.vocab) and ours.vocab != theirs.vocab:
        raise DlncError(
            f"{where}: the teacher has a vocabulary of {theirs.vocab} tokens and the model "
            f"{ours.vocab}; {hint}"
        )
    bounded = theirs.positions is not None
    if bounded and (ours.positions is None or ours.positions > theirs.positions):
        raise DlncError(
            f"{where}: the teacher covers {theirs.positions} positions and the model "
            f"{ours.positions or 'any number'}; {hint}"
        )


def recover(
    student: nn.Module,
    teacher: nn.Module | None,
    model_folder: Path,
    options: FinetuneOptions,
    state_dir: Path | None,
    progress: ProgressFn | None = None,
    notices: list[str] | None = None,
) -> FinetuneResult:
    """Load the data (tokenizer from `model_folder`, batches fitted to `student`) and
    fine-tune `student` in place; what reading the data noticed goes to `notices`."""
    data = load_data(
        options.data, model_folder, eval_data=options.eval_data,
        eval_fraction=options.eval_fraction, model=student,
    )  # fmt: skip
    if notices is not None:  # (compress: its calibration data may have said the same)
        notices.extend(n for n in data.notices if n not in notices)
    return finetune(
        student,
        data.train,
        teacher=teacher,
        config=options.config,
        eval_batches=data.held_out,
        state_dir=state_dir,
        resume=options.resume,
        mask_token_id=data.mask_token_id,
        progress=progress,
    )


def finetune_checkpoint(
    compressed: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    teacher: str | os.PathLike | None = None,
    options: FinetuneOptions,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> RecoveryRun:
    """Fine-tune the dlnc export at `compressed` (distilling from the checkpoint at
    `teacher`) and export the result to `out_dir` with the report's `finetune` section."""
    compressed, out = Path(compressed), Path(out_dir)
    if not options.resume:
        check_output_dir(out, overwrite, compressed)
    student = load_model(compressed)
    if not any(True for _ in _factorized(student)):
        raise DlncError(f"{compressed}: no factorized layers; give a `dlnc compress` output")
    if is_quantized(student):
        raise DlncError(
            f"{compressed}: its weights are integer codes (quantized); fine-tune the float "
            "export, then quantize it (dlnc quantize)"
        )
    original = load_model(teacher) if teacher is not None else None
    if original is not None:
        check_teacher(student, original, teacher)
    state_dir = options.state_dir or out.parent / f"{out.name}.state"
    notices: list[str] = []
    result = recover(student, original, compressed, options, state_dir, progress, notices)
    report = {**_read_report(compressed), "dlnc_version": dlnc_version()}
    report["finetune"] = {**result.report(), "state_dir": str(state_dir)}
    if not result.is_main_process:
        return RecoveryRun(None, report, result, notices)
    written = export(
        result.model,
        out,
        config=getattr(result.model, "config", None),
        source=compressed,
        report=report,
        method=_method(compressed),
        overwrite=overwrite or options.resume,
    )
    return RecoveryRun(written, report, result, notices)


def finetune_compressed(
    loaded, teacher: nn.Module, out_dir: Path, options: FinetuneOptions, progress=None
) -> FinetuneResult:
    """`compress_checkpoint`'s fine-tuning step: train `loaded.model` (just compressed, in
    memory) against `teacher`; `progress` hears the steps."""

    state_dir = options.state_dir or out_dir.parent / f"{out_dir.name}.state"
    notices = loaded.notices
    result = recover(loaded.model, teacher, loaded.source, options, state_dir, progress, notices)
    loaded.model = result.model
    return result


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the original model, taken before compression changes it in place."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _factorized(model: nn.Module):
    from compressor.core.surgery import factorized_layers

    return factorized_layers(model).values()


def _read_report(folder: Path) -> dict:
    path = folder / "report.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _method(folder: Path) -> str:
    section = json.loads((folder / "config.json").read_text()).get("dlnc", {})
    return section.get("method", "svd")
