"""Compression of a checkpoint larger than memory, one tensor at a time (the pipelines'
executors over a `StreamedCheckpoint`).

The model's module tree is built on the meta device (no weights), so targets, recipes and
rank overrides are chosen exactly as in memory. Then two passes over the targeted weights:
  1) the rank method's spectra, one weight read at a time (any registered data-free method:
     through `methods.Weights`, whose solver reads a weight when it needs it), or with data
     block by block (`pipelines.sequential.whiten_pass`, after the output sensitivity's
     forward and backward pass block by block, `pipelines.sensitivity`, for output-aware
     ranks); then the ranks (a global `keep` budget needs every spectrum, or gain, first);
  2) the output shards tensor by tensor (`pipelines.writer`): untouched tensors are copied,
     each targeted weight is factorized at its rank while a worker thread already factorizes
     the next one. With error correction a pass between the two refits each block's layers
     on the compressed model's own inputs (`pipelines.sequential.correct_pass`).
Peak memory: about two layers' working sets plus a fixed overhead, never the model. The export
(tensors, shards, config.json's `dlnc` section, report.json) is the in-memory path's, bit for
bit: both run the same method code through the same solver.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from compressor import methods
from compressor.core.compress import CompressionReport
from compressor.core.plan import MethodInputs, Weights
from compressor.core.progress import ProgressFn
from compressor.core.ranks import allocate_ranks
from compressor.core.solver import Solver
from compressor.core.surgery import count_params
from compressor.io.export import dlnc_section, write_folder
from compressor.io.files import scratch_beside
from compressor.io.streaming import return_freed_memory
from compressor.options import CompressOptions
from compressor.pipelines import parallel
from compressor.pipelines.reductions import keep_reductions
from compressor.pipelines.sensitivity import sensitivity_pass
from compressor.pipelines.sequential import correct_pass, whiten_pass
from compressor.pipelines.source import (
    LayerSpec,
    NotStreamable,
    StreamedCheckpoint,
    open_streamed,
)
from compressor.pipelines.writer import ShardWriter, factorize_skeleton
from compressor.workflows.report import (
    CompressResult,
    available_memory,
    build_report,
    record_correction,
)
from compressor.workflows.speedplan import serving_dtype, speed_policy
from compressor.workflows.targets import expand_overrides, select_targets

__all__ = ["NotStreamable", "stream_compress"]


def stream_compress(
    path: str | os.PathLike, out: Path, options: CompressOptions, progress: ProgressFn | None
) -> CompressResult:
    """`compress_checkpoint` streamed (see the module docstring).

    Raises `NotStreamable` before writing anything when the checkpoint needs the in-memory
    path (pickle weights, keys the model does not name, an architecture without a class)."""
    ckpt = open_streamed(path, options.load)
    return_freed_memory()  # memory bounded by one layer, not by what malloc keeps
    loaded = ckpt.loaded
    total_before = count_params(loaded.model)
    targets = select_targets(loaded, options)
    layers = {n: ckpt.layer(n, m) for n, m in targets.items()}
    with scratch_beside(out) as tmp:
        state = parallel.world() if options.data_free else None
        solver = _solver(options, state)
        budget = sum(spec.nbytes for spec in ckpt.tensors.specs.values())  # the export's most
        shapes = {n: t.shape for n, t in layers.items()}
        notice = keep_reductions(solver, shapes, tmp, budget)
        if notice is not None:
            loaded.notices.append(notice)
        gains = sensitivity = None
        if options.data_free:
            method = options.resolved
            spectra, weight_spectra, factor = _datafree(
                ckpt, targets, layers, method, solver, state, progress
            )
        else:
            method, weight_spectra = "whiten", _weight_spectra(ckpt, layers, solver)
            sensitivity = _sensitivity(ckpt, layers, options, tmp, progress)
            spectra, factor, gains = whiten_pass(
                ckpt, layers, _data(options, loaded), options.method.damping, solver, tmp,
                _spill_over(options), progress, sensitivity,
            )  # fmt: skip
        policy = expand_overrides(options.policy, list(layers))
        dtype = serving_dtype(loaded.weight_files)
        policy = speed_policy(policy, shapes, options.run.device, dtype, progress)
        for name, decision in allocate_ranks(spectra, shapes, policy, gains).items():
            layers[name].decision = decision
        correction = None
        if method == "whiten" and options.method.correct:
            factor, correction = correct_pass(
                ckpt, layers, factor, _data(options, loaded), options.method.damping,
                options.depth, tmp, _spill_over(options), progress, sensitivity,
            )  # fmt: skip
        factorize_skeleton(loaded.model, layers)
        if state is not None:  # each process factorizes its share; the main one writes
            factor = parallel.shared_factors(ckpt, layers, factor, out, state)
            if not state.is_main_process:
                state.wait_for_everyone()
                return CompressResult(Path(out).resolve(), {}, loaded.notices, weight_spectra)
        fmt = options.export.format
        writer = ShardWriter(ckpt, layers, factor, fmt, options.export.max_shard_size, progress)
        section = dlnc_section(loaded.model, method, fmt, loaded.tensor_mode)
        summary: dict = {}

        def report() -> dict:  # the per-layer errors are known once the factors are written
            done = CompressionReport(method, [writer.reports[n] for n in layers], options.depth)
            summary.update(build_report(loaded, done, total_before, options))
            if correction is not None:
                record_correction(summary, correction, loaded.notices)
            return summary

        try:
            done = write_folder(
                out, writer.write, config=loaded.config, section=section, source=loaded.source,
                report=report, overwrite=options.export.overwrite,
            )  # fmt: skip
        finally:
            if state is not None:
                shutil.rmtree(parallel.parts_dir(out), ignore_errors=True)
                state.wait_for_everyone()
    summary = json.loads((done / "report.json").read_text())  # with bytes_after filled in
    return CompressResult(done, summary, loaded.notices, weight_spectra)


def _solver(options, state) -> Solver:
    """The options' solver; with several processes on GPUs, each on its own GPU."""
    if state is not None and options.run.device is None and state.device.type == "cuda":
        return options.run.solver_for(str(state.device))
    return options.run.solver_for()


def _readers(ckpt: StreamedCheckpoint, layers: dict[str, LayerSpec]) -> dict:
    return {n: ckpt.reader(n, t) for n, t in layers.items()}


def _datafree(ckpt, targets, layers, method: str, solver: Solver, state, progress):
    """1) a data-free method's spectra, through `Weights` read from the checkpoint (with
    several processes each takes its share); its factor function for pass 2, which reads
    each weight again."""
    m = methods.get(method)
    weights = Weights(_readers(ckpt, layers), solver)
    inputs = MethodInputs()
    quiet = progress if state is None else None

    def spectra_of(names: list[str]):
        return m.spectra(weights.subset(names), inputs, quiet)

    spectra = parallel.shared_spectra(list(layers), spectra_of, state)
    factor_fn = m.factor_fn(weights, inputs, spectra)

    def factor(name: str, read, rank: int):
        return factor_fn(name, targets[name], rank)

    weight_spectra = spectra if m.name == "svd" else _weight_spectra(ckpt, layers, solver)
    return spectra, weight_spectra, factor


def _weight_spectra(ckpt, layers, solver: Solver):
    """The weights' own singular values, read from the checkpoint when first asked for (only
    plots read them: a 7B layer's cost 17 s), after the scratch folder is gone."""
    return Weights(_readers(ckpt, layers), replace(solver, kept=None)).spectra


def _sensitivity(ckpt, layers, options, tmp: Path, progress):
    """With `output_aware`: each target's output sensitivity, block by block
    (`pipelines.sensitivity`), for the output-aware gains, factors and correction."""
    if not options.method.output_aware:
        return None
    data = _data(options, ckpt.loaded)
    return sensitivity_pass(ckpt, layers, data, tmp, _spill_over(options), progress)


def _data(options, loaded):
    """The calibration batches (read once per pass: each pass streams them block by block)."""
    from compressor.workflows.plan import calibration_batches

    return calibration_batches(loaded, options.method.data).train


def _spill_over(options: CompressOptions) -> int:
    """Bytes of one block's calibration activations kept in memory before they go to disk
    (beside the output): an eighth of the memory available (`options.run.memory`, measured
    now when None; up to three sets are alive at once with error correction, one block's
    weights and statistics beside them)."""
    memory = options.run.memory
    return (memory if memory is not None else available_memory()) // 8
