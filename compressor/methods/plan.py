"""Rank methods as inputs to `compress_`: the spectra that drive the rank allocation and the
factor function that gives each layer's spectral initialization.

  svd       spectra and factors of W (data-free)
  whiten    spectra of W L and the whitened factors, L L^T the layer's input Gram (section 4)
  dynamics  spectra of [W; dW] (weight and update, each normalised) and W projected on the
            top input directions of that stack (section 5)

`build_plan` turns a method and its statistics into a `Plan`; `estimate_layers` adds the
per-layer rank readings that `dlnc estimate-ranks` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.core.compress import FactorFn, ProgressFn, check_finite
from compressor.core.layers import dense_weight_of
from compressor.core.linalg import (
    breakeven_rank,
    energy_rank,
    singular_values,
    spectral_factors,
    truncation_error,
)
from compressor.core.ranks import RankPolicy, allocate_ranks
from compressor.errors import DlncError
from compressor.methods.calibration import LayerStats
from compressor.methods.dynamics import joint_subspace, update_rank
from compressor.methods.output_aware import (
    channel_weights,
    output_whitened_factor_fn,
    output_whitened_spectrum,
    projection_gains,
)
from compressor.methods.whiten import DEFAULT_DAMPING, Whitener, whitened_factors, whitened_spectrum

__all__ = ["METHODS", "LayerEstimate", "Plan", "build_plan", "estimate_layers"]

METHODS = ("svd", "whiten", "dynamics")
OUTPUT_AWARE = ("svd", "whiten")
"""Methods whose ranks follow the output with data. Dynamics keeps its relative rule: on
MiniLM (keep 0.5) the output-aware gains gave cosine 0.376 against 0.438 (docs/data-aware.md)."""


@dataclass
class Plan:
    """What `compress_` needs for one method, plus the spectra behind it (for reports)."""

    method: str
    spectra: dict[str, torch.Tensor]  # drive the rank allocation
    factor_fn: FactorFn
    shapes: dict[str, tuple[int, int]]  # (out, in) of each target
    weight_spectra: dict[str, torch.Tensor]  # singular values of W
    whiten_spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # of W L
    update_spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # of dW
    gains: dict[str, torch.Tensor] | None = None  # output-aware allocation (None: by spectra)


def build_plan(
    method: str,
    targets: Mapping[str, nn.Module],
    stats: Mapping[str, LayerStats] | None = None,
    updates: Mapping[str, torch.Tensor] | None = None,
    damping: float = DEFAULT_DAMPING,
    progress: ProgressFn | None = None,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
) -> Plan:
    """The plan of `method`; whiten needs `stats`, dynamics needs `updates`. With `stats`
    and `sensitivity` (per-channel output sensitivity), ranks follow each layer's effect on
    the model's output (`methods.output_aware`), and whiten's factors minimise it."""
    if method not in METHODS:
        raise DlncError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "whiten" and stats is None:
        raise DlncError("--method whiten needs calibration data: give --data")
    if method == "dynamics" and updates is None:
        raise DlncError("--method dynamics needs --reference CKPT, or --warmup-steps K with --data")
    weights = {n: dense_weight_of(m) for n, m in targets.items()}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    for name, w in weights.items():
        check_finite(name, w)
    weight_spectra = _each(weights, singular_values, "spectra", progress)
    factor_fn = _svd_factor_fn(weights, weight_spectra)
    plan = Plan(method, weight_spectra, factor_fn, shapes, weight_spectra)
    whiteners = {}
    if stats is not None:
        whiteners = _whiteners(stats, damping)
        plan.whiten_spectra = _each(
            weights, lambda w, n: whitened_spectrum(w, whiteners[n]), "whiten", progress, True
        )
    if updates is not None:
        plan.update_spectra = {n: singular_values(updates[n]) for n in targets}
    if method == "whiten":
        plan.spectra = plan.whiten_spectra
        plan.factor_fn = _whiten_factor_fn(weights, whiteners)
    elif method == "dynamics":
        joint = {n: joint_subspace(weights[n], updates[n]) for n in targets}
        plan.spectra = {n: s for n, (s, _) in joint.items()}
        plan.factor_fn = _subspace_factor_fn(weights, joint)
    if stats is not None and sensitivity is not None and method in OUTPUT_AWARE:
        _make_output_aware(plan, weights, whiteners, sensitivity, joint if updates else None)
    return plan


def _make_output_aware(plan: Plan, weights, whiteners, sensitivity, joint) -> None:
    """Gains in the model-output metric ||D E L|| for every method; whiten's factors too."""
    d = {n: channel_weights(sensitivity[n]) for n in weights}
    if plan.method == "whiten":
        spectra = {n: output_whitened_spectrum(w, whiteners[n], d[n]) for n, w in weights.items()}
        plan.gains = {n: s.square() for n, s in spectra.items()}
        plan.factor_fn = output_whitened_factor_fn(weights, whiteners, d)
        return
    plan.gains = {}
    for name, w in weights.items():
        if plan.method == "dynamics":
            q = joint[name][1].T
        else:
            q = torch.linalg.svd(w.detach().double(), full_matrices=False)[2].T
        plan.gains[name] = projection_gains(w, q, whiteners[name], d[name])


def _each(weights, fn, stage, progress, with_name=False) -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, w) in enumerate(weights.items()):
        out[name] = fn(w, name) if with_name else fn(w)
        if progress:
            progress(stage, i + 1, len(weights))
    return out


def _whiteners(stats: Mapping[str, LayerStats], damping: float) -> dict[str, Whitener | None]:
    """One eigen-decomposition per distinct Gram (q/k/v share theirs)."""
    by_id: dict[int, Whitener | None] = {}
    out = {}
    for name, st in stats.items():
        if id(st) not in by_id:
            by_id[id(st)] = Whitener.from_gram(st.gram / max(st.rows, 1), damping)
        out[name] = by_id[id(st)]
    return out


def _svd_factor_fn(weights, spectra) -> FactorFn:
    def factor(name: str, module: nn.Module, rank: int):
        s = spectra[name]
        up, down = spectral_factors(weights[name], rank)
        return up, down, truncation_error(s, rank) / max(float(s.norm()), 1e-30)

    return factor


def _whiten_factor_fn(weights, whiteners) -> FactorFn:
    """rel error: the relative output error on the calibration inputs, ||(W - W')L|| / ||WL||."""

    def factor(name: str, module: nn.Module, rank: int):
        up, down, _, rel = whitened_factors(weights[name], whiteners[name], rank)
        return up, down, rel

    return factor


def _subspace_factor_fn(weights, joint) -> FactorFn:
    """W Q Q^T with Q the top-k joint input directions, split into balanced factors."""

    def factor(name: str, module: nn.Module, rank: int):
        w = weights[name].detach().double()
        q = joint[name][1][:rank].T  # in x k, orthonormal columns
        u, s, vh = torch.linalg.svd(w @ q, full_matrices=False)
        root = s.sqrt()
        up, down = u * root, root[:, None] * (vh @ q.T)
        rel = float((w - up @ down).norm()) / max(float(w.norm()), 1e-30)
        return up, down, rel

    return factor


@dataclass
class LayerEstimate:
    """One layer's rank readings (energy ranks at `tau`) and the rank chosen for it."""

    name: str
    shape: tuple[int, int]
    spectrum_rank: int  # of W
    whiten_rank: int | None  # of W L (None without data)
    dynamics_rank: int | None  # of dW (None without an update)
    chosen: int | None  # None: kept dense
    breakeven: float


def estimate_layers(plan: Plan, policy: RankPolicy, tau: float = 0.9) -> list[LayerEstimate]:
    """Per layer: the energy ranks of each available spectrum and the plan's allocation."""
    shapes = plan.shapes
    chosen = allocate_ranks(plan.spectra, shapes, policy, plan.gains)
    rows = []
    for name, s in plan.weight_spectra.items():
        ws, us = plan.whiten_spectra.get(name), plan.update_spectra.get(name)
        rows.append(
            LayerEstimate(
                name=name,
                shape=shapes[name],
                spectrum_rank=energy_rank(s, tau),
                whiten_rank=energy_rank(ws, tau) if ws is not None else None,
                dynamics_rank=update_rank(us, s, tau) if us is not None else None,
                chosen=chosen[name].rank,
                breakeven=breakeven_rank(*shapes[name]),
            )
        )
    return rows
