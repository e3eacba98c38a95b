"""From data-aware options to a rank-method `Plan`: read the data, collect the statistics the
method needs (calibration Grams, a reference diff, a warm-up run), and build the plan.

Used by `compress_checkpoint` (only what the chosen method needs) and by
`dlnc estimate-ranks` (everything the options make available, to compare the methods).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compressor.core.compress import ProgressFn
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint, load_checkpoint
from compressor.methods.plan import METHODS, Plan, build_plan
from compressor.methods.whiten import DEFAULT_DAMPING
from compressor.training.data import DataOptions, load_samples, load_tokenizer, make_batches

__all__ = ["AwareOptions", "PlanInfo", "make_plan"]


@dataclass(frozen=True)
class AwareOptions:
    """The rank method and what feeds it (the CLI's --method, --data ... options)."""

    method: str = "svd"  # svd | whiten | dynamics
    data: DataOptions | None = None  # calibration / warm-up data
    reference: Path | None = None  # the checkpoint this one was trained or fine-tuned from
    warmup_steps: int = 0  # dynamics: steps of a warm-up run on the data (0: none)
    warmup_lr: float = 1e-4  # learning rate of the warm-up run (AdamW)
    damping: float = DEFAULT_DAMPING  # whiten: relative damping of the Gram matrices

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DlncError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.warmup_steps < 0:
            raise DlncError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.data is None:
            raise DlncError("--warmup-steps trains on data: give --data")
        if self.damping < 0:
            raise DlncError(f"`damping` must be >= 0, got {self.damping}")
        if self.method == "whiten" and self.data is None:
            raise DlncError("--method whiten needs calibration data: give --data")
        if self.method == "dynamics" and not (self.reference or self.warmup_steps):
            raise DlncError(
                "--method dynamics needs --reference CKPT, or --warmup-steps K with --data"
            )


@dataclass
class PlanInfo:
    """What was measured on the way: for reports and benchmarks."""

    samples: int = 0
    calibration_seconds: float = 0.0
    statistics_bytes: int = 0  # memory held by the distinct Gram matrices
    warmup_seconds: float = 0.0
    sensitivity_seconds: float = 0.0  # the backward passes of the output-aware allocation
    notes: list[str] = field(default_factory=list)


def make_plan(
    loaded: LoadedCheckpoint,
    targets: Mapping[str, nn.Module],
    options: AwareOptions,
    progress: ProgressFn | None = None,
    everything: bool = False,
) -> tuple[Plan, PlanInfo]:
    """The plan of `options.method`; with `everything`, also the statistics of the other
    methods that the options allow (for side-by-side rank estimates)."""
    info = PlanInfo()
    need_grams = options.data is not None  # every method's ranks follow the output with data
    need_updates = options.method == "dynamics" or (
        everything and (options.reference or options.warmup_steps)
    )
    batches, tokenizer = _batches(loaded, options.data, info) if options.data else ([], None)
    stats = _grams(loaded.model, targets, batches, info, progress) if need_grams else None
    updates = None
    if need_updates:
        updates = _updates(loaded, targets, options, batches, tokenizer, info, progress)
    sensitivity = _sensitivity(loaded.model, targets, batches, info, progress) if stats else None
    plan = build_plan(
        options.method, targets, stats, updates, options.damping, progress, sensitivity
    )
    return plan, info


def _sensitivity(model, targets, batches, info: PlanInfo, progress):
    """Each layer's output sensitivity: one backward pass per calibration batch."""
    from compressor.methods.sensitivity import output_sensitivity

    started = time.perf_counter()
    sensitivity = output_sensitivity(model, targets, batches, progress=progress)
    info.sensitivity_seconds = time.perf_counter() - started
    return sensitivity


def _batches(loaded: LoadedCheckpoint, data: DataOptions, info: PlanInfo):
    if loaded.tensor_mode:
        raise DlncError(
            "this checkpoint has no architecture (tensor mode), so it cannot run on data; "
            "use --method svd, or give its config.json with --config"
        )
    samples = load_samples(data.path, data.text_field, data.label_field, data.samples, data.seed)
    tokenizer = load_tokenizer(loaded.source, data.tokenizer) if samples.is_text else None
    info.samples = len(samples)
    return make_batches(samples, tokenizer, data.max_length, data.batch_size), tokenizer


def _grams(model, targets, batches, info: PlanInfo, progress):
    from compressor.methods.calibration import collect_grams

    started = time.perf_counter()
    stats = collect_grams(model, targets, batches, progress)
    info.calibration_seconds = time.perf_counter() - started
    distinct = {id(st): st.gram for st in stats.values()}
    info.statistics_bytes = sum(g.numel() * g.element_size() for g in distinct.values())
    return stats


def _updates(loaded, targets, options: AwareOptions, batches, tokenizer, info, progress):
    from compressor.methods.dynamics import reference_updates, warmup_updates

    if options.reference is not None:
        reference = load_checkpoint(options.reference, allow_pickle=False).model
        return reference_updates(targets, reference)
    started = time.perf_counter()
    mask_id = getattr(tokenizer, "mask_token_id", None)
    updates = warmup_updates(
        loaded.model,
        targets,
        batches,
        options.warmup_steps,
        lr=options.warmup_lr,
        mask_token_id=mask_id,
        seed=options.data.seed if options.data else 0,
        progress=progress,
    )
    info.warmup_seconds = time.perf_counter() - started
    return updates
