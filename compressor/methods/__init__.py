"""Rank methods, one file each, behind a registry (`compressor.methods.registry`).

    svd       spectra and factors of W (data-free)
    whiten    spectra of W L and the whitened factors, L L^T the layer's input Gram
    dynamics  spectra of [W; dW] and W on the input directions its update moves in

`get(name)` returns a method (an unknown name is an error that lists the known ones);
`build_plan(name, targets, ...)` gives what `compress_` needs. A new method is one new file
here that subclasses `RankMethod` and calls `register`, plus its import below.
"""

from compressor.core.plan import MethodInputs, Plan, Weights
from compressor.methods import dynamics, svd, whiten  # noqa: F401  (each registers itself)
from compressor.methods.registry import (
    LayerEstimate,
    RankMethod,
    auto_method,
    build_plan,
    check_inputs,
    estimate_layers,
    get,
    names,
    register,
)

__all__ = [
    "LayerEstimate",
    "MethodInputs",
    "Plan",
    "RankMethod",
    "Weights",
    "auto_method",
    "build_plan",
    "check_inputs",
    "estimate_layers",
    "get",
    "names",
    "register",
]
