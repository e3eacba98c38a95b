"""The data-free compression pass: spectra -> ranks -> factorized layers, with a report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear, check_depth, dense_weight_of
from compressor.core.linalg import (
    Decomposition,
    breakeven_rank,
    decompose,
    factors_from,
    floor_breakeven,
    row_blocks,
    singular_values,
    truncation_error,
)
from compressor.core.progress import ProgressFn
from compressor.core.ranks import LayerRank, RankPolicy, allocate_ranks, factor_params
from compressor.core.surgery import replace_module
from compressor.errors import DlncError

__all__ = [
    "CompressionReport",
    "FactorFn",
    "LayerReport",
    "check_finite",
    "compress_",
    "dense_report",
    "layer_decompositions",
    "layer_spectra",
    "svd_factor_fn",
]

FactorFn = Callable[[str, nn.Module, int], tuple[torch.Tensor, torch.Tensor, float]]
"""factor_fn(name, module, rank) -> (up, down, relative error): the spectral initialization."""


@dataclass
class LayerReport:
    """What happened to one targeted layer."""

    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int | None  # None: kept dense
    params_before: int  # weight parameters (biases are kept whole and not counted)
    params_after: int
    rel_error: float  # ||W - W'||_F / ||W||_F of the kept weight (0 when dense)
    breakeven: float  # the break-even rank in*out/(in+out)
    note: str = ""


@dataclass
class CompressionReport:
    """Per-layer decisions and the totals over the targeted layers."""

    method: str
    layers: list[LayerReport]
    depth: int = 2

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "depth": self.depth,
            "targeted_params_before": self.params_before,
            "targeted_params_after": self.params_after,
            "targeted_keep": self.params_after / max(self.params_before, 1),
            "layers": [asdict(r) for r in self.layers],
        }


def check_finite(name: str, weight: torch.Tensor) -> None:
    """A NaN/Inf weight is a broken checkpoint: a `DlncError` naming the layer."""
    for part in row_blocks(weight):  # a block at a time: isfinite works in float32
        if not torch.isfinite(part).all():
            raise DlncError(f"{name}: the weight holds NaN or Inf values")


def layer_spectra(
    targets: dict[str, nn.Module], progress: ProgressFn | None = None
) -> dict[str, torch.Tensor]:
    """Singular values of every target's weight; a NaN/Inf weight is a `DlncError`."""
    spectra = {}
    for i, (name, module) in enumerate(targets.items()):
        weight = dense_weight_of(module)
        check_finite(name, weight)
        spectra[name] = singular_values(weight)
        if progress:
            progress("spectra", i + 1, len(targets))
    return spectra


def layer_decompositions(
    targets: dict[str, nn.Module], progress: ProgressFn | None = None
) -> dict[str, Decomposition]:
    """One decomposition per target: its spectrum, and singular vectors up to break-even
    (a higher rank stays dense), so ranks and factors come from a single pass."""
    decomps = {}
    for i, (name, module) in enumerate(targets.items()):
        weight = dense_weight_of(module)
        check_finite(name, weight)
        keep = max(1, floor_breakeven(*weight.shape))
        decomps[name] = decompose(weight, keep)
        if progress:
            progress("spectra", i + 1, len(targets))
    return decomps


def svd_factor_fn(decomps: dict[str, Decomposition]) -> FactorFn:
    """The data-free spectral initialization: the truncated SVD of the weight."""

    def factor(name: str, module: nn.Module, rank: int):
        d = decomps[name]
        up, down = factors_from(dense_weight_of(module), d, rank)
        return up, down, truncation_error(d.s, rank) / max(float(d.s.norm()), 1e-30)

    return factor


def compress_(
    model: nn.Module,
    targets: dict[str, nn.Module],
    policy: RankPolicy,
    depth: int = 2,
    method: str = "svd",
    spectra: dict[str, torch.Tensor] | None = None,
    factor_fn: FactorFn | None = None,
    progress: ProgressFn | None = None,
    gains: dict[str, torch.Tensor] | None = None,
) -> CompressionReport:
    """In place: replace each target by a `FactorizedLinear` of the rank `policy` chooses.

    `spectra` (default: the weights' singular values) drive the rank choice; `factor_fn`
    (default: truncated SVD, one decomposition per layer) gives the factors; `gains`, when
    given, share a `keep` budget instead (output-aware: `core.allocate`). Layers at or above
    break-even stay dense.
    """
    check_depth(depth)
    if not targets:
        raise DlncError("no layer to compress: the targets matched no Linear/Conv1D module")
    if factor_fn is None:
        decomps = layer_decompositions(targets, progress)
        factor_fn = svd_factor_fn(decomps)
        spectra = spectra if spectra is not None else {n: d.s for n, d in decomps.items()}
    elif spectra is None:
        spectra = layer_spectra(targets, progress)
    shapes = {n: tuple(dense_weight_of(m).shape) for n, m in targets.items()}
    ranks = allocate_ranks(spectra, shapes, policy, gains)
    reports = []
    for i, (name, module) in enumerate(targets.items()):
        reports.append(_compress_one(model, name, module, ranks[name], depth, factor_fn))
        if progress:
            progress("factorize", i + 1, len(targets))
    return CompressionReport(method, reports, depth)


def dense_report(name: str, shape: tuple[int, int], reason: str = "") -> LayerReport:
    """The report of a targeted layer kept dense (`reason`: why)."""
    before = factor_params(shape, None)
    return LayerReport(name, shape, None, before, before, 0.0, breakeven_rank(*shape), reason)


def _compress_one(model, name, module, decision: LayerRank, depth, factor_fn) -> LayerReport:
    shape = tuple(dense_weight_of(module).shape)
    if decision.dense:
        return dense_report(name, shape, decision.reason)
    before = factor_params(shape, None)
    k_star = breakeven_rank(*shape)
    up, down, err = factor_fn(name, module, decision.rank)
    layer = FactorizedLinear.from_dense(module, decision.rank, depth, factors=(up, down))
    replace_module(model, name, layer)
    return LayerReport(
        name, shape, decision.rank, before, factor_params(shape, decision.rank), err, k_star
    )
