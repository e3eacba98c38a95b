"""The `whiten` rank method: spectra of W L and the whitened truncation, L L^T each layer's
input Gram (the maths on bare tensors: `compressor.core.whitening`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compressor.core.compress import FactorFn
from compressor.core.linalg import energy_rank
from compressor.core.plan import Lazy, MethodInputs, Weights
from compressor.core.progress import ProgressFn
from compressor.core.whitening import Whitener, whitened_factors, whitened_spectrum, whiteners
from compressor.methods.output_aware import (
    channel_weights,
    output_whitened_factor_fn,
    output_whitened_spectrum,
)
from compressor.methods.registry import RankMethod, register

__all__ = ["Whiten"]


class Whiten(RankMethod):
    """Activation-aware: spectra of W L and the truncation of W L, L L^T each layer's input
    Gram (docs/method.md 4), so the error is measured on the layer's outputs."""

    name = "whiten"
    column = "whiten"
    needs = frozenset({"grams"})
    priority = 1
    requirement = "`method` whiten needs calibration data: give `data`"

    def spectra(
        self, weights: Weights, inputs: MethodInputs, progress: ProgressFn | None
    ) -> Mapping[str, torch.Tensor]:
        """Computed when read (output-aware ranks under `keep` never read them)."""
        roots = self._roots(inputs)
        return Lazy(weights.tensors, lambda n: whitened_spectrum(weights.tensors[n], roots[n]))

    def factor_fn(self, weights: Weights, inputs: MethodInputs, spectra: dict) -> FactorFn:
        """rel error: the relative output error on calibration inputs, ||(W - W')L|| / ||WL||."""
        roots = self._roots(inputs)

        def factor(name: str, module: nn.Module, rank: int):
            up, down, _, rel = whitened_factors(weights.tensors[name], roots[name], rank)
            return up, down, rel

        return factor

    def reading(
        self, name: str, spectrum: torch.Tensor, weights: Weights, inputs: MethodInputs, tau: float
    ) -> int:
        return energy_rank(spectrum, tau)

    def output_aware(
        self, weights: Weights, inputs: MethodInputs, spectra: dict
    ) -> tuple[dict[str, torch.Tensor], FactorFn]:
        """Truncate D W L (D: the output sensitivity's channel weights): its squared singular
        values are the gains, and its truncation gives the factors."""
        roots = self._roots(inputs)
        d = {n: channel_weights(inputs.sensitivity[n]) for n in weights.tensors}
        gains = {
            n: output_whitened_spectrum(w, roots[n], d[n]).square()
            for n, w in weights.tensors.items()
        }
        return gains, output_whitened_factor_fn(weights.tensors, roots, d)

    @staticmethod
    def _roots(inputs: MethodInputs) -> dict[str, Whitener | None]:
        return inputs.once("whiteners", lambda: whiteners(inputs.grams, inputs.damping))


register(Whiten())
