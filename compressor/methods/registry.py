"""The rank-method registry: each method lives in its own file and registers itself here.

A method turns the targeted weights (and, if it needs them, calibration statistics or weight
updates) into a `Plan`: the spectra that drive the rank allocation under `keep`, and the factor
function that gives each layer's spectral initialization. Adding a method is one new file that
subclasses `RankMethod` and calls `register`; the recipe schema, the CLI's `method` choices,
the "auto" rule, the input checks and `dlnc estimate-ranks`' columns all read the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressor.core.compress import FactorFn, check_finite
from compressor.core.layers import dense_weight_of
from compressor.core.linalg import breakeven_rank
from compressor.core.plan import INPUTS, MethodInputs, Plan, Weights
from compressor.core.progress import ProgressFn
from compressor.core.ranks import RankPolicy, allocate_ranks
from compressor.core.solver import Solver
from compressor.errors import DlncError
from compressor.methods.output_aware import projection_output_gains

__all__ = [
    "LayerEstimate",
    "RankMethod",
    "auto_method",
    "build_plan",
    "check_inputs",
    "decompose_weights",
    "estimate_layers",
    "get",
    "names",
    "plan_of",
    "register",
]


class RankMethod:
    """One rank method. Subclasses set the class attributes and implement `spectra`,
    `factor_fn` and `reading`."""

    name: ClassVar[str]
    column: ClassVar[str]  # its column in `estimate-ranks` (and `<column>_rank` in JSON)
    needs: ClassVar[frozenset[str]] = frozenset()  # from INPUTS
    priority: ClassVar[int] = 0  # "auto" picks the highest-priority method whose needs are met
    requirement: ClassVar[str] = ""  # the one-line error when its needs are not met
    output_aware_ranks: ClassVar[bool] = True  # with data, ranks follow the model's output

    def spectra(
        self, weights: Weights, inputs: MethodInputs, progress: ProgressFn | None
    ) -> dict[str, torch.Tensor]:
        """The spectrum of each layer that the rank allocation reads."""
        raise NotImplementedError

    def factor_fn(self, weights: Weights, inputs: MethodInputs, spectra: dict) -> FactorFn:
        """factor(name, module, rank) -> (up, down, relative error)."""
        raise NotImplementedError

    def reading(
        self, name: str, spectrum: torch.Tensor, weights: Weights, inputs: MethodInputs, tau: float
    ) -> int:
        """The rank this method reads for layer `name` at energy `tau` (`spectrum`: the one
        its `spectra` gave)."""
        raise NotImplementedError

    def directions(self, name: str, weights: Weights, inputs: MethodInputs) -> torch.Tensor:
        """The input directions (in x k, orthonormal columns, most important first) that this
        method's factors keep: what output-aware allocation prices."""
        raise NotImplementedError

    def output_aware(
        self, weights: Weights, inputs: MethodInputs, spectra: dict
    ) -> tuple[dict[str, torch.Tensor], FactorFn | None]:
        """With calibration Grams and output sensitivities: each direction's gain in model-
        output units (`methods.output_aware`), and factors for that metric when the method
        has its own (None: keep `factor_fn`'s)."""
        return projection_output_gains(self, weights, inputs), None


_REGISTRY: dict[str, RankMethod] = {}
_ALIASES = {"spectrum": "svd"}


def register(method: RankMethod) -> RankMethod:
    """Add a method (an instance) under its name; a second method of the same name is an error."""
    if method.name in _REGISTRY or method.name in _ALIASES or method.name == "auto":
        raise ValueError(f"a rank method named {method.name!r} is already registered")
    unknown = set(method.needs) - set(INPUTS)
    if unknown:
        raise ValueError(f"{method.name}: unknown needs {sorted(unknown)} (known: {INPUTS})")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered methods, from the least to the most informed (by priority)."""
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].priority, n)))


def get(name: str) -> RankMethod:
    """The method called `name` (or an alias such as `spectrum`); a `DlncError` listing the
    known names otherwise."""
    method = _REGISTRY.get(_ALIASES.get(name, name))
    if method is None:
        raise DlncError(f"`method` must be one of {', '.join(names())}, got {name!r}")
    return method


def auto_method(available: frozenset[str]) -> str:
    """The "auto" rule: the highest-priority method whose needs the available inputs meet
    (dynamics with updates, whiten with calibration data, else svd)."""
    usable = [m for m in _REGISTRY.values() if m.needs <= available]
    return max(usable, key=lambda m: m.priority).name


def check_inputs(name: str, available: frozenset[str]) -> None:
    """A `DlncError` (the method's own message) when `available` lacks what it needs."""
    method = get(name)
    if not method.needs <= available:
        raise DlncError(method.requirement)


def build_plan(
    method: str,
    targets: Mapping[str, nn.Module],
    stats: Mapping[str, object] | None = None,
    updates: Mapping[str, torch.Tensor] | None = None,
    damping: float = 1e-2,
    progress: ProgressFn | None = None,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
) -> Plan:
    """The plan of `method` for `targets`; whiten needs `stats`, dynamics needs `updates`.
    With `stats` and `sensitivity` (per-channel output sensitivity), ranks follow each
    layer's effect on the model's output (`methods.output_aware`)."""
    inputs = MethodInputs(stats, updates, damping, sensitivity)
    return plan_of(method, decompose_weights(targets), inputs, progress)


def plan_of(
    method: str, weights: Weights, inputs: MethodInputs, progress: ProgressFn | None = None
) -> Plan:
    """The plan of `method` from already decomposed weights (shared by several plans)."""
    m = get(method)
    check_inputs(m.name, inputs.available)
    shapes = {n: tuple(w.shape) for n, w in weights.tensors.items()}
    spectra = m.spectra(weights, inputs, progress)

    def reading(name: str, tau: float) -> int:
        return m.reading(name, spectra[name], weights, inputs, tau)

    factor_fn = m.factor_fn(weights, inputs, spectra)
    gains = None
    if m.output_aware_ranks and inputs.grams is not None and inputs.sensitivity is not None:
        gains, output_factor_fn = m.output_aware(weights, inputs, spectra)
        factor_fn = output_factor_fn or factor_fn
    return Plan(m.name, spectra, factor_fn, shapes, weights.spectra, reading, gains)


def decompose_weights(targets: Mapping[str, nn.Module], solver: Solver | None = None) -> Weights:
    """The targets' weights in memory, read through `solver` (each checked for NaN/Inf as it
    is read: a `DlncError` naming the layer). Nothing is decomposed until a method asks."""
    return Weights({n: _ModuleWeight(n, m) for n, m in targets.items()}, solver)


class _ModuleWeight:
    """Reads a module's weight (Linear layout), checked for NaN/Inf unless `unchecked()`."""

    def __init__(self, name: str, module: nn.Module, checked: bool = True) -> None:
        self.name, self.module, self.checked = name, module, checked
        self.shape = tuple(dense_weight_of(module).shape)

    def __call__(self) -> torch.Tensor:
        # a fresh copy in the same layout, as a checkpoint reader gives (Conv1D: a transposed
        # view): BLAS kernels may round differently on differently aligned memory, and both
        # paths must compute alike
        weight = dense_weight_of(self.module).detach().clone()
        if self.checked:
            check_finite(self.name, weight)
        return weight

    def unchecked(self) -> _ModuleWeight:
        return _ModuleWeight(self.name, self.module, checked=False)

    def row_blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """W's rows `rows` at a time, each block contiguous, as a checkpoint reader gives
        them: the Gram route then sums the same blocks the same way in memory and streamed."""
        return (b.clone(memory_format=torch.contiguous_format) for b in self().split(rows))

    def column_blocks(self, columns: int) -> Iterator[torch.Tensor]:
        """W^T's rows `columns` at a time, each block contiguous."""
        return (b.clone(memory_format=torch.contiguous_format) for b in self().T.split(columns))


@dataclass
class LayerEstimate:
    """One layer's rank readings (energy ranks at `tau`, one per method that could run) and
    the rank chosen for it."""

    name: str
    shape: tuple[int, int]
    readings: dict[str, int]  # method column -> rank (only the methods whose inputs exist)
    chosen: int | None  # None: kept dense
    breakeven: float

    def to_dict(self) -> dict:
        """JSON form: `<column>_rank` for every registered method (None where it did not run)."""
        ranks = {f"{get(n).column}_rank": self.readings.get(get(n).column) for n in names()}
        return {"name": self.name, "shape": list(self.shape), **ranks,
                "chosen": self.chosen, "breakeven": self.breakeven}  # fmt: skip


def estimate_layers(
    plans: Mapping[str, Plan], chosen: str, policy: RankPolicy, tau: float = 0.9
) -> list[LayerEstimate]:
    """Per layer: each plan's rank reading at `tau`, and the allocation of plan `chosen`."""
    plan = plans[chosen]
    allocated = allocate_ranks(plan.spectra, plan.shapes, policy, plan.gains)
    return [
        LayerEstimate(
            name=name,
            shape=plan.shapes[name],
            readings={get(m).column: p.reading(name, tau) for m, p in plans.items()},
            chosen=allocated[name].rank,
            breakeven=breakeven_rank(*plan.shapes[name]),
        )
        for name in plan.weight_spectra
    ]
