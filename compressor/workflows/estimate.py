"""`estimate-ranks` as a workflow: the ranks every available method reads for each targeted
layer, and the ranks the chosen method allocates, through the same recipe, targets and rank
policy as `compress_checkpoint` (so a saved ranks file always fits `compress`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from compressor.core.layers import dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.ranks import RankPolicy
from compressor.errors import DlncError
from compressor.methods import LayerEstimate, estimate_layers
from compressor.options import CompressOptions, MethodOptions
from compressor.workflows.compress import expand_overrides, load, select_targets
from compressor.workflows.plan import PlanInfo, make_plans
from compressor.workflows.speedplan import serving_dtype, speed_policy

__all__ = ["Estimate", "estimate_checkpoint"]


@dataclass
class Estimate:
    """Per-layer rank readings of every method that could run, and the chosen allocation."""

    method: str  # the method whose allocation is `chosen`
    policy: RankPolicy
    tau: float
    layers: list[LayerEstimate]
    spectra: dict[str, torch.Tensor]  # the chosen method's spectra (for plots)
    info: PlanInfo
    notices: list[str] = field(default_factory=list)  # what the user should be told

    @property
    def chosen(self) -> dict[str, int | None]:
        """Layer -> rank (None: kept dense), as a ranks file records it."""
        return {r.name: r.chosen for r in self.layers}


def estimate_checkpoint(
    path: str | os.PathLike,
    options: CompressOptions,
    tau: float = 0.9,
    progress: ProgressFn | None = None,
) -> Estimate:
    """Load the checkpoint, select targets as `compress_checkpoint` does, and read each
    method's ranks at energy `tau`."""
    if not 0.0 < tau <= 1.0:
        raise DlncError(f"`tau` must be in (0, 1], got {tau}")
    loaded = load(path, options.load)
    targets = select_targets(loaded, options)
    aware = options.method or MethodOptions()
    plans, info = make_plans(loaded, targets, aware, progress, everything=True)
    shapes = {n: tuple(dense_weight_of(m).shape) for n, m in targets.items()}
    policy = expand_overrides(options.policy, list(targets))
    dtype = serving_dtype(loaded.weight_files)
    policy = speed_policy(policy, shapes, options.run.device, dtype, progress)
    chosen = aware.resolved
    layers = estimate_layers(plans, chosen, policy, tau)
    return Estimate(chosen, policy, tau, layers, plans[chosen].spectra, info, loaded.notices)
