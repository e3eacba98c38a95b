"""From data-aware options to rank-method plans: read the data, collect what the methods need
(calibration Grams, a reference diff, a warm-up run), and build each method's `Plan`.

Used by `compress_checkpoint` (the chosen method only) and by `estimate_checkpoint` (every
method the options make possible, to compare them side by side).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from compressor import methods
from compressor.core.progress import ProgressFn
from compressor.core.solver import Solver
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint, load_checkpoint
from compressor.options import MethodOptions
from compressor.training.data import Batches, DataOptions, load_data

__all__ = ["HELD_OUT", "PlanInfo", "calibration_batches", "make_plans"]

HELD_OUT = 0.125
"""The share of a causal LM's calibration samples held out (none below 4 samples) to measure
its perplexity before and after compression, so that a broken model never passes silently."""


@dataclass
class PlanInfo:
    """What was measured on the way: for reports and benchmarks."""

    samples: int = 0
    calibration_seconds: float = 0.0
    statistics_bytes: int = 0  # memory held by the distinct Gram matrices
    warmup_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    data: Batches | None = None  # the calibration data read (for error-correcting calibration)
    sensitivity: Mapping | None = None  # layer -> per-channel output sensitivity, if measured
    perplexity_before: float | None = None  # a causal LM's, on the held-out calibration text
    # (measured by `compress` before it compresses: `workflows.quality.measure_before`)


def make_plans(
    loaded: LoadedCheckpoint,
    targets: Mapping[str, nn.Module],
    options: MethodOptions,
    progress: ProgressFn | None = None,
    everything: bool = False,
    solver: Solver | None = None,
) -> tuple[dict[str, methods.Plan], PlanInfo]:
    """The plan of the chosen method (`options.resolved`); with `everything`, also the plans of
    every other method the options can feed (for side-by-side rank estimates). `solver`
    decomposes the weights (default: `Solver()`, as the streamed path's)."""
    info = PlanInfo()
    chosen = options.resolved
    wanted = [m for m in methods.names() if methods.get(m).needs <= options.available]
    wanted = wanted if everything else [chosen]
    needs = frozenset().union(*(methods.get(m).needs for m in wanted))
    data = info.data = _data(loaded, options.data, info) if options.data is not None else None
    # with data, every method's ranks follow the model's output: Grams and sensitivities
    grams, sensitivity = _statistics(loaded.model, targets, data, options, info, progress)
    inputs = methods.MethodInputs(
        grams=grams,
        updates=_updates(loaded, targets, options, data, info, progress)
        if "updates" in needs
        else None,
        damping=options.damping,
        sensitivity=sensitivity,
    )
    info.sensitivity = inputs.sensitivity
    weights = methods.registry.decompose_weights(targets, solver)
    plans = {m: methods.registry.plan_of(m, weights, inputs, progress) for m in wanted}
    return plans, info


def _data(loaded: LoadedCheckpoint, data: DataOptions, info: PlanInfo) -> Batches:
    if loaded.tensor_mode:
        raise DlncError(
            "this checkpoint has no architecture (tensor mode), so it cannot run on data; "
            "use `method` svd, or give its config.json with `config`"
        )
    batches = calibration_batches(loaded, data)
    info.samples = batches.samples
    return batches


def calibration_batches(loaded: LoadedCheckpoint, data: DataOptions) -> Batches:
    """The calibration data as batches fitted to the model; a causal LM's last `HELD_OUT` of
    them held out (to measure its perplexity), in memory and streamed alike. What reading it
    noticed goes to `loaded.notices` once, however many passes read it."""
    from compressor.core.tasks import task_of

    causal = task_of(loaded.model) == "causal_lm"
    held = HELD_OUT if causal else 0.0
    batches = load_data(data, loaded.source, eval_fraction=held, model=loaded.model)
    loaded.notices.extend(n for n in batches.notices if n not in loaded.notices)
    return batches


def _statistics(model, targets, data: Batches | None, options: MethodOptions, info, progress):
    """The calibration Grams (None without data) and, when the ranks are output-aware, each
    layer's output sensitivity, counted on the same forward passes as the Grams."""
    from compressor.methods.calibration import GramCollector, collect_grams
    from compressor.methods.sensitivity import output_sensitivity

    if data is None:
        return None, None
    started = time.perf_counter()
    sensitivity = None
    if options.output_aware:
        collector = GramCollector(targets)
        sensitivity = output_sensitivity(
            model, targets, data.train, progress=progress, grams=collector
        )
        stats = collector.result()
    else:
        stats = collect_grams(model, targets, data.train, progress)
    info.calibration_seconds = time.perf_counter() - started
    distinct = {id(st): st.gram for st in stats.values()}
    info.statistics_bytes = sum(g.numel() * g.element_size() for g in distinct.values())
    return stats, sensitivity


def _updates(loaded, targets, options: MethodOptions, data: Batches | None, info, progress):
    from compressor.methods.dynamics import reference_updates, warmup_updates

    if options.reference is not None:
        reference = load_checkpoint(options.reference, allow_pickle=False).model
        return reference_updates(targets, reference)
    started = time.perf_counter()
    updates = warmup_updates(
        loaded.model,
        targets,
        data.train,
        options.warmup_steps,
        lr=options.warmup_lr,
        mask_token_id=data.mask_token_id,
        seed=options.data.seed,
        progress=progress,
    )
    info.warmup_seconds = time.perf_counter() - started
    return updates
