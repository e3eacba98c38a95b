"""dlnc: low-rank compression of pretrained networks (deep linear network compression)."""

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import collapse_, factorized_layers, merge_
from compressor.core.targets import find_targets
from compressor.io.export import export, load_pretrained
from compressor.io.hf_register import register_when_imported

register_when_imported()  # `from_pretrained` loads dlnc exports (transformers stays unimported)

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
