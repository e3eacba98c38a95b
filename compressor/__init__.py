"""dlnc: low-rank compression of pretrained networks (deep linear network compression)."""

from compressor.export import export, load_pretrained
from compressor.layers import FactorizedLinear
from compressor.surgery import collapse_, factorized_layers, merge_
from compressor.targets import find_targets

__version__ = "0.1.0"

__all__ = [
    "FactorizedLinear",
    "__version__",
    "collapse_",
    "export",
    "factorized_layers",
    "find_targets",
    "load_pretrained",
    "merge_",
]
