"""Quantized weights for a compressed model: every targeted layer, factorized or left dense,
stored as integer codes with a scale and zero point per group (`dlnc compress --quantize
int8|int4`, in the same run; `dlnc quantize EXPORT`, for an export written before).

With calibration data (`--data`, the text a causal LM generated for itself, or a text
encoder's random word pieces: `workflows/quality.generated_data`) the rounding
is GPTQ's, block by block on each layer's input Gram counted over the compressed model as
quantized so far (so the inputs are the ones the quantized layers will see; a factorized
layer's down factor first, then its up factor on the rounded down's outputs:
compressor/core/quantize.py, methods/quantize.py); without data, rounding to nearest. The
report says which, and the stored bits per weight of the targeted layers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from compressor.core.layers import FactorizedLinear, QuantLinear, dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.quantize import QuantSpec
from compressor.core.surgery import factorized_layers, is_quantized, quantize_
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.options import CompressOptions, ExportOptions, MethodOptions
from compressor.workflows.report import CompressResult

__all__ = ["quantize_checkpoint", "quantize_model", "stored_bits", "tensor_bytes"]


def quantize_model(
    model: nn.Module,
    names: Sequence[str],
    spec: QuantSpec,
    batches: Iterable | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """In place: the layers `names` of `model` quantized by `spec`, by GPTQ on the input Grams
    of `batches` (calibration batches) or, without, to nearest; the report's `quantization`."""
    from compressor.methods.quantize import quantize_blocks

    started = time.perf_counter()
    floats = sum(_dense_size(model.get_submodule(n)) for n in names)
    if batches is not None:
        quantize_blocks(model, names, spec, batches, progress)
    else:
        quantize_(model, list(names), spec)
    bits = sum(stored_bits(model.get_submodule(n)) for n in names)
    return {
        "bits": spec.bits,
        "group_size": spec.group,
        "rounding": "gptq" if batches is not None else "nearest",
        "layers": len(names),
        "bits_per_weight": round(bits / floats, 4) if floats else None,
        "load_memory_bytes": tensor_bytes(model),
        "seconds": round(time.perf_counter() - started, 1),
    }


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a loaded model holds (parameters, tied ones once, and persistent
    buffers: the codes, scales and zero points): what loading it takes, since the loaders
    build no float copy of a quantized weight."""
    seen, total = set(), 0
    buffers = [b for n, b in model.named_buffers() if _persistent(model, n)]
    for t in [*model.parameters(), *buffers]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in model.get_submodule(owner)._non_persistent_buffers_set


def stored_bits(layer: nn.Module) -> int:
    """Bits a quantized layer stores for its weights (codes, scales, zero points; no bias)."""
    if isinstance(layer, FactorizedLinear):
        return stored_bits(layer.down) + stored_bits(layer.up)
    if isinstance(layer, QuantLinear):
        codes = layer.out_features * layer.in_features * layer.spec.bits
        return codes + layer.scales.numel() * 16 + layer.zeros.numel() * 8
    return sum(p.numel() * p.element_size() * 8 for p in layer.parameters(recurse=True))


def _dense_size(layer: nn.Module) -> int:
    """The weights of the dense layer a target stands for (out x in)."""
    if isinstance(layer, (FactorizedLinear, QuantLinear)):
        return layer.out_features * layer.in_features
    return dense_weight_of(layer).numel()


def quantize_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    options: CompressOptions | None = None,
    progress: ProgressFn | None = None,
) -> CompressResult:
    """Quantize a dlnc export (its factors, and the layers the recipe targets that stayed
    dense) or a plain checkpoint (the recipe's targets) and export it (`<input>-<int4|int8>/`).
    `options.export` says how (`quantize`, `group_size`); the calibration data is
    `options.method.data`, or inputs of the model's own making (`generate`: text a causal LM
    generates, a text encoder's random word pieces), or none (round to nearest)."""
    from compressor.io.checkpoint import resolve_model
    from compressor.io.export import check_output_dir, default_output_dir, disk_size, export
    from compressor.io.section import is_export, read_section
    from compressor.workflows.plan import PlanInfo, calibration_batches
    from compressor.workflows.quality import generated_data, measure_before, record_perplexity
    from compressor.workflows.targets import quantize_targets

    options = options or CompressOptions(export=ExportOptions(quantize="int4"))
    spec = options.export.quant
    if spec is None:
        raise DlncError("`quantize` says how: int8 or int4")
    path = Path(resolve_model(path, options.load.revision))
    out = (
        Path(out_dir) if out_dir is not None else default_output_dir(path, options.export.quantize)
    )
    check_output_dir(out, options.export.overwrite, path)
    section = read_section(path) if is_export(path) else None
    loaded = _loaded(path, section, options)
    if is_quantized(loaded.model):
        raise DlncError(f"{path}: already quantized; quantize the float export")
    chains = list(factorized_layers(loaded.model))
    inside = tuple(f"{n}." for n in chains)
    names = chains + [n for n in quantize_targets(loaded, options) if not n.startswith(inside)]
    aware, generated = generated_data(loaded, options.method or MethodOptions())
    measured = PlanInfo()
    if aware.data is not None:
        measured.data = calibration_batches(loaded, aware.data)
    measure_before(loaded.model, measured)
    batches = measured.data.train if measured.data is not None else None
    summary = {
        "input": str(path),
        "model_type": loaded.model_type,
        "quantization": quantize_model(loaded.model, names, spec, batches, progress),
        "bytes_before": disk_size(loaded.weight_files),
        "bytes_after": None,
        "notices": loaded.notices,
    }
    if generated is not None:
        summary["generated_calibration"] = generated.to_dict()
    record_perplexity(summary, loaded.notices, loaded.model, measured, "after_quantize", generated)
    method = (section or {}).get("method", "none")
    written = export(
        loaded.model, out, config=loaded.config, source=path, report=summary, method=method,
        overwrite=options.export.overwrite, max_shard_size=options.export.max_shard_size,
    )  # fmt: skip
    summary["bytes_after"] = disk_size(sorted(written.glob("*.safetensors")))
    return CompressResult(written, summary, loaded.notices, {})


def _loaded(path: Path, section: dict | None, options: CompressOptions) -> LoadedCheckpoint:
    """The model at `path`: an export with its factorized layers, or a plain checkpoint."""
    from compressor.io.checkpoint import load_checkpoint
    from compressor.io.load import load_pretrained
    from compressor.io.section import export_files

    if section is None:
        o = options.load
        return load_checkpoint(path, o.config, o.allow_pickle, o.trust_remote_code, o.tensor_mode)
    if section.get("tensor_mode"):
        raise DlncError(f"{path}: a tensor-mode export has no forward pass to quantize")
    model = load_pretrained(path)
    return LoadedCheckpoint(model, path, export_files(path), model.config)
