"""One call from a checkpoint on disk to a compressed export: load, target, compress, export."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from compressor.core.compress import (
    CompressionReport,
    ProgressFn,
    compress_,
    layer_decompositions,
    svd_factor_fn,
)
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import count_params
from compressor.core.targets import find_targets, matches, weight_readers
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint, load_checkpoint
from compressor.io.export import check_output_dir, default_output_dir, disk_size, export
from compressor.io.tensor_model import TENSOR_MODE_EXCLUDE
from compressor.workflows.finetune import RecoveryOptions, finetune_compressed, teacher_copy
from compressor.workflows.plan import AwareOptions, make_plan

__all__ = [
    "CompressOptions",
    "CompressResult",
    "check_patterns",
    "compress_checkpoint",
    "expand_overrides",
    "select_targets",
]


@dataclass
class CompressOptions:
    """Everything `compress_checkpoint` needs besides the input path."""

    policy: RankPolicy = field(default_factory=lambda: RankPolicy(keep=0.5))
    depth: int = 2  # chain depth while in memory (export always collapses to 2 factors)
    include: list[str] | None = None  # names or `re:` regexes to compress (None: every dense)
    exclude: list[str] = field(default_factory=list)  # names or `re:` regexes to leave alone
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

    def __post_init__(self) -> None:
        if self.depth < 2:
            raise DlncError(f"`depth` must be >= 2, got {self.depth}")


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
    if not targets:
        raise DlncError("no layer to compress: the include/exclude patterns matched nothing")
    _check_overrides(options, targets)
    return targets


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
    loaded = load_checkpoint(
        path, options.config, options.allow_pickle, options.trust_remote_code, options.tensor_mode
    )
    total_before = count_params(loaded.model)
    targets = select_targets(loaded, options)
    spectra, method_kwargs = _method_inputs(loaded, targets, options, progress)
    policy = expand_overrides(options.policy, list(targets))
    teacher = teacher_copy(loaded.model) if options.finetune is not None else None
    report = compress_(
        loaded.model, targets, policy, options.depth, progress=progress, **method_kwargs
    )
    summary = build_report(loaded, report, total_before, options)
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
        merge=options.merge,
        overwrite=options.overwrite,
        max_shard_size=options.max_shard_size,
    )
    summary["bytes_after"] = weights_size(written)
    _rewrite_json(written / "report.json", summary)
    return CompressResult(written, summary, loaded.notices, spectra)


def _method_inputs(loaded, targets, options: CompressOptions, progress) -> tuple[dict, dict]:
    """The weights' spectra, and `compress_`'s spectra/factor_fn/method: plain SVD, or a
    data-aware plan (whiten, dynamics) built from `options.aware`."""
    if options.aware is None or (options.aware.method == "svd" and options.aware.data is None):
        decomps = layer_decompositions(targets, progress)
        spectra = {n: d.s for n, d in decomps.items()}
        return spectra, {"spectra": spectra, "factor_fn": svd_factor_fn(decomps)}
    plan, _ = make_plan(loaded, targets, options.aware, progress)
    kwargs = {"spectra": plan.spectra, "factor_fn": plan.factor_fn, "method": plan.method,
              "gains": plan.gains}  # fmt: skip
    return plan.weight_spectra, kwargs


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


def _rewrite_json(path: Path, data: dict) -> None:
    """Replace a small JSON file atomically (write beside it, then rename over it)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
