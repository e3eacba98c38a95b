"""dlnc: low-rank compression of pretrained networks (deep linear network compression).

The verbs a Python user needs:

    from compressor import compress_checkpoint, CompressOptions, RankPolicy
    options = CompressOptions(policy=RankPolicy(keep=0.5))
    result = compress_checkpoint("model", "model-dlnc", options)
    model = load_pretrained("model-dlnc")

In memory: `compress_(model, find_targets(model), RankPolicy(keep=0.5))`, `finetune(...)`,
`quantize_(model, names, QuantSpec(bits=4, group=64), grams)`, `export(model, folder)`.
The heavier verbs are imported on first use, so `import compressor` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from compressor.core.layers import FactorizedLinear, QuantLinear
from compressor.core.quantize import QuantSpec
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import collapse_, factorized_layers, merge_, quantize_
from compressor.core.targets import find_targets

if TYPE_CHECKING:
    from compressor.core.compress import compress_
    from compressor.io.export import export
    from compressor.io.load import load_pretrained
    from compressor.options import CompressOptions
    from compressor.training.loop import FinetuneConfig, finetune
    from compressor.workflows.compress import compress_checkpoint
    from compressor.workflows.estimate import estimate_checkpoint
    from compressor.workflows.finetune import finetune_checkpoint
from compressor.io.hf_register import register_when_imported

register_when_imported()  # `from_pretrained` loads dlnc exports (transformers stays unimported)

__version__ = "0.1.0"

_LAZY = {
    "compress_": "compressor.core.compress",
    "export": "compressor.io.export",
    "load_pretrained": "compressor.io.load",
    "finetune": "compressor.training.loop",
    "FinetuneConfig": "compressor.training.loop",
    "CompressOptions": "compressor.options",
    "compress_checkpoint": "compressor.workflows.compress",
    "estimate_checkpoint": "compressor.workflows.estimate",
    "finetune_checkpoint": "compressor.workflows.finetune",
}

__all__ = [
    "CompressOptions",
    "FactorizedLinear",
    "FinetuneConfig",
    "QuantLinear",
    "QuantSpec",
    "RankPolicy",
    "__version__",
    "collapse_",
    "compress_",
    "compress_checkpoint",
    "estimate_checkpoint",
    "export",
    "factorized_layers",
    "find_targets",
    "finetune",
    "finetune_checkpoint",
    "load_pretrained",
    "merge_",
    "quantize_",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
