"""What an export's model card states (compressor/io/model_card.py writes it): sizes before
and after, ranks by layer group, the held-out numbers, the quantization; from the model being
exported (`card_facts`), or from report.json and the `dlnc` section of a streamed export
(`report_facts`)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from compressor.core.layers import QuantLinear
from compressor.core.surgery import count_params, factorized_layers, quantized_layers
from compressor.io.section import check_format

__all__ = ["CardFacts", "card_facts", "report_facts"]


@dataclass
class CardFacts:
    """What the card states about an export."""

    method: str
    merged: bool
    keep: float | None  # the policy's keep, when known
    params_before: int
    params_after: int
    bytes_before: int  # tensor bytes of the weights (the safetensors header aside)
    bytes_after: int
    groups: dict[str, list[int]]  # layer name pattern (numbers -> *) -> ranks
    shapes: dict[str, tuple[int, int]]  # layer name pattern -> (out, in)
    perplexity: dict | None = None  # report.json's: before / after on held-out text
    evaluation: dict | None = None  # report.json's finetune.eval: original / before / after
    quantization: dict | None = None  # report.json's: bits, group size, rounding, bits a weight


def card_facts(model: nn.Module, method: str, format: str, report: dict | None) -> CardFacts:
    """Sizes before/after from the model itself: each chain as exported (two factors of its
    rank, or dense for `format` "dense") and each quantized layer as stored (codes, scales,
    zero points), against the dense layer it replaced; a tied tensor counted once."""
    check_format(format)
    merged = format == "dense"
    params = count_params(model)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    size = _float_size(model)
    chain = dense = kept = 0  # parameters: in memory / dense layers / exported factors
    chain_b = dense_b = kept_b = 0  # the same in bytes
    groups: dict[str, list[int]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for name, layer in factorized_layers(model).items():
        c, c_b = _float_weights(layer)
        d = layer.in_features * layer.out_features
        k = layer.rank * (layer.in_features + layer.out_features)
        k_b = _quant_bytes(layer) if isinstance(layer.up, QuantLinear) else k * size
        chain, dense, kept = chain + c, dense + d, kept + k
        chain_b, dense_b, kept_b = chain_b + c_b, dense_b + d * size, kept_b + k_b
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        groups[pattern].append(layer.rank)
        shapes[pattern] = (layer.out_features, layer.in_features)
    for layer in quantized_layers(model).values():  # its weight is codes, not a parameter
        d = layer.in_features * layer.out_features
        dense, kept = dense + d, kept + d
        dense_b, kept_b = dense_b + d * size, kept_b + _quant_bytes(layer)
    before, before_b = params - chain + dense, state_bytes - chain_b + dense_b
    after, after_b = params - chain + kept, state_bytes - chain_b + kept_b
    policy = (report or {}).get("policy") or {}
    return CardFacts(
        method=method, merged=merged, keep=policy.get("keep"), params_before=before,
        params_after=before if merged else after, bytes_before=before_b,
        bytes_after=before_b if merged else after_b, groups=dict(groups), shapes=shapes,
        perplexity=(report or {}).get("perplexity"), evaluation=_evaluation(report),
        quantization=(report or {}).get("quantization"),
    )  # fmt: skip


def _float_size(model: nn.Module) -> int:
    """Bytes of one element of the model's float weights (4 when it has none)."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return floats[0].element_size() if floats else 4


def _float_weights(layer: nn.Module) -> tuple[int, int]:
    """A chain's float weights in memory, bias aside: (elements, bytes)."""
    weights = [p for n, p in layer.named_parameters() if n.endswith("weight")]
    return sum(p.numel() for p in weights), sum(p.numel() * p.element_size() for p in weights)


def _quant_bytes(layer: nn.Module) -> int:
    """Bytes of a quantized layer's (or chain's) codes, scales and zero points."""
    keys = ("qweight", "scales", "zeros")
    return sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n.endswith(keys))


def _evaluation(report: dict | None) -> dict | None:
    return ((report or {}).get("finetune") or {}).get("eval") or None


def report_facts(report: dict, section: dict) -> CardFacts:
    """The card's facts from an export's report.json and `dlnc` section, for exports written
    without the model in memory (streamed): parameters from the report, bytes on disk."""
    groups: dict[str, list[int]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for name, spec in section.get("layers", {}).items():
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        groups[pattern].append(spec["rank"])
        shapes[pattern] = tuple(spec["shape"])
    merged = bool(section.get("merged"))
    return CardFacts(
        method=section.get("method", "svd"), merged=merged,
        keep=(report.get("policy") or {}).get("keep"),
        params_before=report.get("model_params_before") or 0,
        params_after=report.get("model_params_after") or 0,
        bytes_before=report.get("bytes_before") or 0, bytes_after=report.get("bytes_after") or 0,
        groups=dict(groups), shapes=shapes, perplexity=report.get("perplexity"),
        evaluation=_evaluation(report), quantization=report.get("quantization"),
    )  # fmt: skip
