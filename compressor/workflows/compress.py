"""One call from a checkpoint on disk to a compressed export: load, target, compress, export."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.core.compress import compress_
from compressor.core.layers import dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.ranks import RankPolicy
from compressor.core.solver import Solver
from compressor.core.surgery import count_params
from compressor.errors import DlncError
from compressor.io.checkpoint import (
    LoadedCheckpoint,
    load_checkpoint,
    resolve_model,
    weight_files,
)
from compressor.io.export import check_output_dir, default_output_dir, disk_size, export
from compressor.io.files import scratch_beside
from compressor.io.section import is_export
from compressor.options import CompressOptions, LoadOptions, MethodOptions
from compressor.pipelines.reductions import keep_reductions
from compressor.workflows.finetune import finetune_compressed, teacher_copy
from compressor.workflows.plan import PlanInfo, make_plans
from compressor.workflows.quality import generated_data, measure_before, record_perplexity
from compressor.workflows.report import (
    CompressResult,
    available_memory,
    build_report,
    record_correction,
    weights_size,
)
from compressor.workflows.speedplan import serving_dtype, speed_policy
from compressor.workflows.targets import (
    check_patterns,
    expand_overrides,
    quantize_targets,
    select_targets,
)

if TYPE_CHECKING:
    from compressor.methods.sequential import Correction
    from compressor.training.generated import Generated

__all__ = [
    "CompressOptions",
    "CompressResult",
    "check_patterns",
    "compress_checkpoint",
    "expand_overrides",
    "load",
    "select_targets",
    "streams_by_itself",
]

IN_MEMORY_PEAK = 2.5
"""The in-memory path's peak RSS over the checkpoint's bytes (2.34-2.40x measured on
BERT-base, docs/benchmarks.md): a data-free run whose peak would not fit streams by itself."""


def compress_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    options: CompressOptions | None = None,
    progress: ProgressFn | None = None,
) -> CompressResult:
    """Compress the checkpoint at `path` (or cached Hub name) and export it (`<input>-dlnc/`)."""
    options = options or CompressOptions()
    path = resolve_model(path, options.load.revision)
    out = Path(out_dir) if out_dir is not None else default_output_dir(path)
    check_output_dir(out, options.export.overwrite, Path(path))
    if is_export(path):
        raise DlncError(
            f"{path} is a dlnc export already: compress the original model, or store this one "
            "quantized (dlnc quantize)"
        )
    if options.run.stream and not (options.data_free or options.streamed_whiten):
        raise DlncError("`stream` works without fine-tuning, with method svd or whiten")
    notices: list[str] = []
    streamed = _streamed(path, out, options, notices, progress)
    if streamed is not None:
        return streamed
    loaded = load(path, options.load)
    loaded.notices[:0] = notices
    total_before = count_params(loaded.model)
    targets = select_targets(loaded, options)
    stored = quantize_targets(loaded, options) if options.export.quant is not None else []
    shapes = {n: tuple(dense_weight_of(m).shape) for n, m in targets.items()}
    if options.export.bits_per_weight is not None:
        options = _bits_budget(options, loaded, shapes, stored)
    policy = _policy(options, loaded, shapes, progress)
    method, generated = generated_data(loaded, options.method or MethodOptions())
    if generated is not None:
        options = replace(options, method=method)
        loaded.notices.append(_generated_notice(generated))
    teacher = teacher_copy(loaded.model) if options.finetune is not None else None
    with scratch_beside(out) as tmp:
        solver = options.run.solver_for()
        budget = disk_size(loaded.weight_files)  # the export takes at most the input's bytes
        _notice(loaded.notices, keep_reductions(solver, shapes, tmp, budget))
        kwargs = _method_inputs(loaded, targets, options, solver, progress)
        spectra, method_kwargs, measured = kwargs
        measure_before(loaded.model, measured)
        report = compress_(
            loaded.model, targets, policy, options.depth, progress=progress, **method_kwargs
        )
    summary = build_report(loaded, report, total_before, options)
    if generated is not None:
        summary["generated_calibration"] = generated.to_dict()
    if measured.data is not None and options.method.correct:
        done = _correct(loaded, targets, measured, options.method, progress)
        record_correction(summary, done, loaded.notices)
    record_perplexity(summary, loaded.notices, loaded.model, measured, "after", generated)
    if options.finetune is not None:
        tuned = finetune_compressed(loaded, teacher, out, options.finetune, progress)
        summary["finetune"] = tuned.report()
        record_perplexity(
            summary, loaded.notices, loaded.model, measured, "after_finetune", generated
        )
        if not tuned.is_main_process:  # under `accelerate launch` only the main one writes
            return CompressResult(out, summary, loaded.notices, spectra)
    if options.export.quant is not None:
        spec = options.export.quant
        _quantize(loaded, stored, spec, measured, summary, generated, progress)
        summary["quantization"]["budget"] = options.export.bits_per_weight
    written = export(
        loaded.model,
        out,
        config=loaded.config,
        source=loaded.source,
        report=summary,
        method=report.method,
        format=options.export.format,
        overwrite=options.export.overwrite,
        max_shard_size=options.export.max_shard_size,
    )
    summary["bytes_after"] = weights_size(written)  # export wrote it into report.json
    return CompressResult(written, summary, loaded.notices, spectra)


def _bits_budget(options: CompressOptions, loaded, shapes: dict, stored: list[str]):
    """The options with the `keep` that stores `bits_per_weight` bits a weight over the
    quantized layers (the targets factorized, the others dense), said in the notices."""
    from compressor.core.quantize import keep_for_bits

    model = loaded.model
    others = [
        tuple(dense_weight_of(model.get_submodule(n)).shape) for n in stored if n not in shapes
    ]
    export = options.export
    keep = keep_for_bits(export.bits_per_weight, export.quant, list(shapes.values()), others)
    loaded.notices.append(
        f"{export.bits_per_weight:g} bits a weight at {export.quantize}: keep {keep:.3f} of "
        "the targeted weights"
    )
    policy = replace(options.policy, keep=keep, energy=None, rank=None)
    return replace(options, policy=policy)


def _streamed(path, out: Path, options: CompressOptions, notices: list[str], progress):
    """The streamed run's result when `stream` is asked, or when the model would not fit in
    memory (a checkpoint that cannot stream then loads in memory, said in `notices`); None
    for the in-memory path."""
    by_itself = streams_by_itself(path, options)
    if not (options.run.stream or by_itself):
        return None
    from compressor.workflows.stream import NotStreamable, stream_compress

    need = ""  # what the in-memory path would take, said when streaming by itself
    if by_itself:
        need = f"about {IN_MEMORY_PEAK * _checkpoint_bytes(path, options) / 1e9:.1f} GB"
        if options.export.quant is not None:
            raise DlncError(f"`quantize` runs in memory, which would need {need} here")
    try:
        done = stream_compress(path, out, options, progress)
    except NotStreamable as e:
        if options.run.stream:
            raise DlncError(f"`stream`: this checkpoint cannot be streamed ({e})") from e
        notices.append(f"not streamed ({e}): loaded in memory ({need})")
        return None
    if by_itself:
        done.notices.insert(0, f"streamed: in memory this would need {need}")
    return done


def _quantize(loaded, names, spec, measured: PlanInfo, summary, generated, progress) -> None:
    """The targeted layers quantized (GPTQ on the calibration data when there is some), and
    the perplexity on the held-out calibration text measured again."""
    from compressor.workflows.quantize import quantize_model

    batches = measured.data.train if measured.data is not None else None
    summary["quantization"] = quantize_model(loaded.model, names, spec, batches, progress)
    record_perplexity(summary, loaded.notices, loaded.model, measured, "after_quantize", generated)


def _policy(options: CompressOptions, loaded, shapes: dict, progress) -> RankPolicy:
    """The run's rank policy for these targets: override patterns expanded, and under
    `speed` never-slower the caps measured for their shapes in the checkpoint's dtype."""
    policy = expand_overrides(options.policy, list(shapes))
    dtype = serving_dtype(loaded.weight_files)
    return speed_policy(policy, shapes, options.run.device, dtype, progress)


def load(path: str | os.PathLike, options: LoadOptions) -> LoadedCheckpoint:
    """The checkpoint at `path` (a Hub name: from the local cache), read as `options` say."""
    return load_checkpoint(
        resolve_model(path, options.revision),
        options.config,
        options.allow_pickle,
        options.trust_remote_code,
        options.tensor_mode,
    )


def _generated_notice(generated: Generated) -> str:
    spec = generated.spec
    how = "cached" if generated.cached else f"{generated.seconds:.0f} s"
    return (
        f"no data: calibrated on {spec.samples} x {spec.length} {generated.inputs} "
        f"({how}; `generate` off for the weights alone)"
    )


def _notice(notices: list[str], notice: str | None) -> None:
    if notice is not None:
        notices.append(notice)


def streams_by_itself(path: str | os.PathLike, options: CompressOptions) -> bool:
    """True when `stream` is unset, the run is data-free and the in-memory path's peak (about
    `IN_MEMORY_PEAK` times the checkpoint) would not fit in the memory available now
    (`options.run.memory`, measured when None)."""
    if options.run.stream is not None or not options.data_free or not Path(path).exists():
        return False  # (a missing path gets load_checkpoint's error)
    memory = options.run.memory if options.run.memory is not None else available_memory()
    return IN_MEMORY_PEAK * _checkpoint_bytes(path, options) > memory


def _checkpoint_bytes(path: str | os.PathLike, options: CompressOptions) -> int:
    _, files = weight_files(Path(path), options.load.allow_pickle)
    return sum(f.stat().st_size for f in files)


def _method_inputs(loaded, targets, options: CompressOptions, solver: Solver, progress):
    """The weights' spectra, `compress_`'s spectra/factor_fn/method from the plan of the
    chosen rank method (`options.method`; plain SVD when there are none), and what was
    measured on the way (the calibration data and sensitivities, for the correction)."""
    aware = options.method or MethodOptions()
    plans, measured = make_plans(loaded, targets, aware, progress, solver=solver)
    plan = plans[aware.resolved]
    kwargs = {"spectra": plan.spectra, "factor_fn": plan.factor_fn, "method": plan.method,
              "gains": plan.gains}  # fmt: skip
    return plan.weight_spectra, kwargs, measured


def _correct(loaded, targets, measured: PlanInfo, aware: MethodOptions, progress) -> Correction:
    """Error-correcting calibration of the compressed model (methods/sequential.py), block by
    block on the calibration data."""
    from compressor.methods.blocks import find_blocks
    from compressor.methods.sequential import Correction, correct_blocks

    try:
        find_blocks(loaded.model)
    except DlncError:
        return Correction(skipped=dict.fromkeys(targets, "the model has no stack of blocks"))
    return correct_blocks(
        loaded.model, targets, measured.data.train, measured.sensitivity, aware.damping,
        progress=progress,
    )  # fmt: skip
