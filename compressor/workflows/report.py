"""What a compression reports: report.json's summary, the error correction's record, and the
result handed back to the caller; one copy for the in-memory and the streamed path."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compressor.core.compress import CompressionReport
from compressor.core.ranks import RankPolicy
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.io.export import disk_size
from compressor.io.section import dlnc_version
from compressor.workflows.speedplan import expected_speed, serving_dtype

if TYPE_CHECKING:
    from compressor.methods.sequential import Correction

__all__ = [
    "CompressResult",
    "available_memory",
    "build_report",
    "record_correction",
    "weights_size",
]


@dataclass
class CompressResult:
    """What was written and what it contains."""

    out_dir: Path
    report: dict
    notices: list[str]
    spectra: dict[str, torch.Tensor]  # singular values of each targeted weight


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (psutil's `available`)."""
    import psutil

    return psutil.virtual_memory().available


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
    _floor_notice(report, options.policy, loaded.notices)
    return {
        "dlnc_version": dlnc_version(),
        "input": str(loaded.source),
        "model_type": loaded.model_type,
        "tensor_mode": loaded.tensor_mode,
        "policy": _policy_dict(options.policy),
        "recipe": options.recipe,
        "merged": options.export.merge,
        **report.to_dict(),
        "model_params_before": total_before,
        "model_params_after": total_before if options.export.merge else total_before - saved,
        "expected_speed": _expected_speed(loaded, report, options),
        "bytes_before": disk_size(loaded.weight_files),
        "bytes_after": None,
        "notes": {
            "targeted_keep": "kept weight parameters / weight parameters of the targeted layers",
            "params": "weight parameters; biases, norms and embeddings are counted in model_*",
        },
        "notices": loaded.notices,
    }


def _expected_speed(loaded: LoadedCheckpoint, report: CompressionReport, options) -> dict:
    """The targeted layers' expected speed-up over dense on the run's device, and a notice
    when some factorized layer is expected slower than the dense one it replaced."""
    layers = {r.name: (r.shape, r.rank) for r in report.layers}
    speed = expected_speed(layers, options.run.device, serving_dtype(loaded.weight_files))
    if speed["slower_layers"] and options.policy.speed != "never-slower":
        loaded.notices.append(
            f"{speed['slower_layers']} factorized layers are expected slower than dense on this "
            "device at some batch shape (`speed` never-slower keeps them dense)"
        )
    return speed


def _floor_notice(report: CompressionReport, policy: RankPolicy, notices: list[str]) -> None:
    """A `keep` below what rank 1 in every layer keeps cannot be met: say what was kept."""
    ranks = {r.rank for r in report.layers}
    kept = report.params_after / max(report.params_before, 1)
    if policy.keep is not None and ranks == {1} and kept > policy.keep:
        notices.append(
            f"`keep` {policy.keep:g} is below rank 1 in every layer: every targeted layer is "
            f"at rank 1, which keeps {kept:.3f} of the targeted weights"
        )


def weights_size(folder: Path) -> int:
    return disk_size(sorted(folder.glob("*.safetensors")))


def _policy_dict(policy: RankPolicy) -> dict:
    return {
        "rank": policy.rank,
        "energy": policy.energy,
        "keep": policy.keep,
        "multiple": policy.multiple,
        "dense_at_breakeven": policy.dense_at_breakeven,
        "speed": policy.speed,
    }
