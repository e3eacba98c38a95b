"""The data-free method: ranks and factors from the singular values and vectors of W."""

from __future__ import annotations

import torch

from compressor.core.compress import FactorFn
from compressor.core.linalg import energy_rank
from compressor.core.plan import MethodInputs, Weights
from compressor.core.progress import ProgressFn, report
from compressor.methods.registry import RankMethod, register

__all__ = ["SVD"]


class SVD(RankMethod):
    """Truncated SVD of each weight (Eckart-Young optimal in the weights' Frobenius norm)."""

    name = "svd"
    column = "spectrum"
    priority = 0

    def spectra(
        self, weights: Weights, inputs: MethodInputs, progress: ProgressFn | None
    ) -> dict[str, torch.Tensor]:
        spectra = {}
        for i, name in enumerate(weights.readers):
            spectra[name] = weights.spectrum(name)
            report(progress, "spectra", i + 1, len(weights.readers))
        return spectra

    def factor_fn(self, weights: Weights, inputs: MethodInputs, spectra: dict) -> FactorFn:
        return lambda name, module, rank: weights.factors(name, rank)

    def reading(
        self, name: str, spectrum: torch.Tensor, weights: Weights, inputs: MethodInputs, tau: float
    ) -> int:
        return energy_rank(spectrum, tau)

    def directions(self, name: str, weights: Weights, inputs: MethodInputs) -> torch.Tensor:
        """The right singular vectors of W (all of them, by singular value)."""
        w = weights.tensors[name].detach().double()
        return torch.linalg.svd(w, full_matrices=False)[2].T


register(SVD())
