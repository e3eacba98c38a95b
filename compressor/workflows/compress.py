"""One call from a checkpoint on disk to a compressed export: load, target, compress, export."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.core.compress import CompressionReport, compress_
from compressor.core.layers import check_depth, dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import count_params
from compressor.core.targets import find_targets, matches, weight_readers
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint, load_checkpoint, weight_files
from compressor.io.export import (
    check_output_dir,
    check_shard_size,
    default_output_dir,
    disk_size,
    export,
)
from compressor.io.tensor_model import TENSOR_MODE_EXCLUDE
from compressor.workflows.finetune import RecoveryOptions, finetune_compressed, teacher_copy
from compressor.workflows.plan import AwareOptions, PlanInfo, make_plans

if TYPE_CHECKING:
    from compressor.methods.sequential import Correction

__all__ = [
    "CompressOptions",
    "CompressResult",
    "check_patterns",
    "compress_checkpoint",
    "expand_overrides",
    "select_targets",
    "streams_by_itself",
]

IN_MEMORY_PEAK = 2.5
"""The in-memory path's peak RSS over the checkpoint's bytes (2.34-2.40x measured on
BERT-base, docs/benchmarks.md): a data-free run whose peak would not fit streams by itself."""


@dataclass
class CompressOptions:
    """Everything `compress_checkpoint` needs besides the input path."""

    policy: RankPolicy = field(default_factory=lambda: RankPolicy(keep=0.5))
    depth: int = 2  # chain depth while in memory (export always collapses to 2 factors)
    include: list[str] | None = None  # names or `re:` regexes to compress (None: every dense)
    exclude: list[str] = field(default_factory=list)  # names or `re:` regexes to leave alone
    square_only: list[str] = field(default_factory=list)  # targeted only where in == out
    config: Path | None = None  # config.json for a bare weights file
    allow_pickle: bool = False  # accept .bin/.pt (pickle) weights
    trust_remote_code: bool = False  # allow a checkpoint's own Python code
    tensor_mode: bool = False  # ignore config.json: compress the state dict's 2-D weights
    merge: bool = False  # export dense weights instead of factors
    overwrite: bool = False  # replace an existing output folder
    max_shard_size: str = "2GB"  # shard the exported weights above this size
    origins: dict[str, str] = field(default_factory=dict)  # include/exclude/overrides: from where
    recipe: dict | None = None  # the recipe these options came from, recorded in report.json
    aware: AwareOptions | None = None  # data-aware rank method and its data (None: plain SVD)
    finetune: RecoveryOptions | None = None  # fine-tune before export (--finetune-steps)
    stream: bool | None = None  # one tensor at a time (memory ~ one layer); None: if too big
    solver: str = "auto"  # SVD of the streamed path: auto, exact or randomized
    device: str | None = None  # linear algebra of the streamed path (None: GPU if there is one)

    def __post_init__(self) -> None:
        check_depth(self.depth)
        check_shard_size(self.max_shard_size)
        if self.solver not in ("auto", "exact", "randomized"):
            raise DlncError(f"`solver` must be auto, exact or randomized, got {self.solver!r}")
        if self.stream and not (self.data_free or self.streamed_whiten):
            raise DlncError("`stream` works without fine-tuning, with method svd or whiten")

    @property
    def data_free(self) -> bool:
        """Plain SVD without fine-tuning: can be streamed (`stream=True`)."""
        no_data = self.aware is None or self.aware.resolved == "svd"
        return no_data and self.finetune is None

    @property
    def streamed_whiten(self) -> bool:
        """Whitened SVD without fine-tuning: streamed (block by block) with `stream=True`."""
        whiten = self.aware is not None and self.aware.resolved == "whiten"
        return whiten and self.finetune is None


@dataclass
class CompressResult:
    """What was written and what it contains."""

    out_dir: Path
    report: dict
    notices: list[str]
    spectra: dict[str, torch.Tensor]  # singular values of each targeted weight


def select_targets(loaded: LoadedCheckpoint, options: CompressOptions) -> dict[str, nn.Module]:
    """The layers to compress; in tensor mode embedding-like names are left alone too.

    Every include/exclude pattern must match a module, and every rank override a target:
    a typo is an error naming the pattern and where it came from, not a silent no-op."""
    check_patterns(loaded.model, options)
    exclude = list(options.exclude)
    if loaded.tensor_mode:
        exclude += TENSOR_MODE_EXCLUDE
    targets = find_targets(loaded.model, options.include, exclude)
    for name in weight_readers(loaded.model, targets):
        del targets[name]
        loaded.notices.append(f"{name} stays dense: its parent reads its .weight directly")
    _drop_narrow(targets, options.square_only, loaded.notices)
    if not targets:
        raise DlncError("no layer to compress: the include/exclude patterns matched nothing")
    _check_overrides(options, targets)
    return targets


def _drop_narrow(targets: dict[str, nn.Module], patterns: list[str], notices: list[str]) -> None:
    """Leave dense the targets matching `square_only` patterns whose weight is not square
    (k_proj/v_proj under grouped-query attention), with one notice per pattern."""
    for pattern in patterns:
        narrow = {
            n: tuple(dense_weight_of(m).shape)
            for n, m in targets.items()
            if matches(n, pattern) and len(set(dense_weight_of(m).shape)) > 1
        }
        for name in narrow:
            del targets[name]
        if narrow:
            out_f, in_f = next(iter(narrow.values()))
            notices.append(
                f"{pattern}: {len(narrow)} layer(s) stay dense: {out_f}x{in_f} is not square "
                "(grouped-query attention), and the recipe targets it only when square"
            )


def check_patterns(model: nn.Module, options: CompressOptions) -> None:
    """Raise a `DlncError` for an include/exclude pattern that matches no module of `model`."""
    names = [n for n, _ in model.named_modules() if n]
    for key in ("include", "exclude"):
        for pattern in getattr(options, key) or ():
            if not any(matches(n, pattern) for n in names):
                where = options.origins.get(key, f"--{key}")
                raise DlncError(f"{where}: '{pattern}' matches no module of this model")


def _check_overrides(options: CompressOptions, targets: dict[str, nn.Module]) -> None:
    for pattern in options.policy.overrides:
        if not any(matches(n, pattern) for n in targets):
            where = options.origins.get("overrides", "rank overrides")
            raise DlncError(f"{where}: '{pattern}' matches no targeted layer")


def expand_overrides(policy: RankPolicy, names: list[str]) -> RankPolicy:
    """The policy with override patterns (names, suffixes, `re:`) turned into full layer
    names; where two patterns match one layer, the later one wins."""
    expanded: dict[str, int] = {}
    for pattern, rank in policy.overrides.items():
        expanded.update({n: rank for n in names if matches(n, pattern)})
    return replace(policy, overrides=expanded)


def compress_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    options: CompressOptions | None = None,
    progress: ProgressFn | None = None,
) -> CompressResult:
    """Compress the checkpoint at `path` and export it (default: `<input>-dlnc/` beside it)."""
    options = options or CompressOptions()
    out = Path(out_dir) if out_dir is not None else default_output_dir(path)
    check_output_dir(out, options.overwrite, Path(path))
    if options.stream and not (options.data_free or options.streamed_whiten):
        raise DlncError("`stream` works without fine-tuning, with method svd or whiten")
    if options.stream and options.streamed_whiten:
        _check_streamed_whiten(options.aware)
    by_itself = streams_by_itself(path, options)
    notices = []
    if options.stream or by_itself:
        from compressor.workflows.stream import NotStreamable, stream_compress

        need = ""  # what the in-memory path would take, said when streaming by itself
        if by_itself:
            need = f"about {IN_MEMORY_PEAK * _checkpoint_bytes(path, options) / 1e9:.1f} GB"
        try:
            done = stream_compress(path, out, options, progress)
        except NotStreamable as e:
            if options.stream:
                raise DlncError(f"`stream`: this checkpoint cannot be streamed ({e})") from e
            notices.append(f"not streamed ({e}): loaded in memory ({need})")
        else:
            if by_itself:
                done.notices.insert(0, f"streamed: in memory this would need {need}")
            return done
    loaded = load_checkpoint(
        path, options.config, options.allow_pickle, options.trust_remote_code, options.tensor_mode
    )
    loaded.notices[:0] = notices
    total_before = count_params(loaded.model)
    targets = select_targets(loaded, options)
    spectra, method_kwargs, measured = _method_inputs(loaded, targets, options, progress)
    policy = expand_overrides(options.policy, list(targets))
    teacher = teacher_copy(loaded.model) if options.finetune is not None else None
    report = compress_(
        loaded.model, targets, policy, options.depth, progress=progress, **method_kwargs
    )
    summary = build_report(loaded, report, total_before, options)
    if measured.data is not None and options.aware.correct:
        done = _correct(loaded, targets, measured, options.aware, progress)
        record_correction(summary, done, loaded.notices)
    if options.finetune is not None:
        tuned = finetune_compressed(loaded, teacher, out, options.finetune, progress)
        summary["finetune"] = tuned.report()
        if not tuned.is_main_process:  # under `accelerate launch` only the main one writes
            return CompressResult(out, summary, loaded.notices, spectra)
    written = export(
        loaded.model,
        out,
        config=loaded.config,
        source=loaded.source,
        report=summary,
        method=report.method,
        format="dense" if options.merge else "factors",
        overwrite=options.overwrite,
        max_shard_size=options.max_shard_size,
    )
    summary["bytes_after"] = weights_size(written)  # export wrote it into report.json
    return CompressResult(written, summary, loaded.notices, spectra)


def _check_streamed_whiten(aware: AwareOptions) -> None:
    """Streamed whitening calibrates block by block: the output-aware ranks (a backward pass
    through the whole model) are not there."""
    if aware.output_aware:
        raise DlncError(
            "`stream` with whiten calibrates block by block, without the output-aware ranks "
            "(a backward pass through the whole model): pass `output_aware` off"
        )


def streams_by_itself(path: str | os.PathLike, options: CompressOptions) -> bool:
    """True when `stream` is unset, the run is data-free and the in-memory path's peak (about
    `IN_MEMORY_PEAK` times the checkpoint) would not fit in the memory available now."""
    if options.stream is not None or not options.data_free or not Path(path).exists():
        return False  # (a missing path gets load_checkpoint's error)
    return IN_MEMORY_PEAK * _checkpoint_bytes(path, options) > available_memory()


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil's `available`)."""
    import psutil

    return psutil.virtual_memory().available


def _checkpoint_bytes(path: str | os.PathLike, options: CompressOptions) -> int:
    _, files = weight_files(Path(path), options.allow_pickle)
    return sum(f.stat().st_size for f in files)


def _method_inputs(loaded, targets, options: CompressOptions, progress):
    """The weights' spectra, `compress_`'s spectra/factor_fn/method from the plan of the
    chosen rank method (`options.aware`; plain SVD when there are none), and what was
    measured on the way (the calibration data and sensitivities, for the correction)."""
    aware = options.aware or AwareOptions()
    plans, measured = make_plans(loaded, targets, aware, progress)
    plan = plans[aware.resolved]
    kwargs = {"spectra": plan.spectra, "factor_fn": plan.factor_fn, "method": plan.method,
              "gains": plan.gains}  # fmt: skip
    return plan.weight_spectra, kwargs, measured


def _correct(loaded, targets, measured: PlanInfo, aware: AwareOptions, progress) -> Correction:
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


def record_correction(summary: dict, done: Correction, notices: list[str]) -> None:
    """Put what the error-correcting calibration did into report.json's `summary`; a notice
    says which layers kept their one-shot factors and why."""
    from compressor.methods.sequential import TOKENS_PER_FEATURE

    summary["correction"] = done.to_dict()
    summary["notes"]["rel_error"] = "of the one-shot fit, before the error correction"
    if done.skipped:
        few = f"too few calibration tokens ({TOKENS_PER_FEATURE} per input feature needed, "
        few += f"{done.tokens} in all: give more or longer samples)"
        reasons = Counter(few if w.endswith("needed") else w for w in done.skipped.values())
        notices.append(
            f"error-correcting calibration refit {len(done.refit)} of "
            f"{len(done.refit) + len(done.skipped)} layers; the others keep their one-shot "
            "factors: " + "; ".join(f"{n}: {why}" for why, n in reasons.items())
        )


def build_report(
    loaded: LoadedCheckpoint, report: CompressionReport, total_before: int, options
) -> dict:
    """report.json: the per-layer report plus whole-model totals and what the ratios mean."""
    saved = report.params_before - report.params_after
    return {
        "input": str(loaded.source),
        "model_type": loaded.model_type,
        "tensor_mode": loaded.tensor_mode,
        "policy": _policy_dict(options.policy),
        "recipe": options.recipe,
        "merged": options.merge,
        **report.to_dict(),
        "model_params_before": total_before,
        "model_params_after": total_before if options.merge else total_before - saved,
        "bytes_before": disk_size(loaded.weight_files),
        "bytes_after": None,
        "notes": {
            "targeted_keep": "kept weight parameters / weight parameters of the targeted layers",
            "params": "weight parameters; biases, norms and embeddings are counted in model_*",
        },
        "notices": loaded.notices,
    }


def weights_size(folder: Path) -> int:
    return disk_size(sorted(folder.glob("*.safetensors")))


def _policy_dict(policy: RankPolicy) -> dict:
    return {
        "rank": policy.rank,
        "energy": policy.energy,
        "keep": policy.keep,
        "multiple": policy.multiple,
        "dense_at_breakeven": policy.dense_at_breakeven,
    }
