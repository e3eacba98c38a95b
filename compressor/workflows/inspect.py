"""`inspect` as a workflow: the spectrum statistics of each layer `compress` would target
(the recipe's targets and the given ones, through `select_targets`), or of each factorized
layer of a dlnc export (their spectra are those of up @ down)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.core.compress import layer_spectra
from compressor.core.layers import dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.stats import spectrum_stats
from compressor.errors import DlncError
from compressor.io.checkpoint import resolve_model
from compressor.io.section import is_export
from compressor.options import CompressOptions
from compressor.workflows.compress import check_patterns, load, select_targets

__all__ = ["Inspection", "inspect_checkpoint"]


@dataclass
class Inspection:
    """One row of statistics per layer, the spectra behind them, and what was noticed."""

    rows: list[dict]  # spectrum_stats(...).to_dict(), plus `rank` for an export's layers
    spectra: dict[str, torch.Tensor]  # singular values of each layer
    ranks: dict[str, int] | None  # an export's ranks (None: a dense checkpoint)
    notices: list[str]


def inspect_checkpoint(
    path: str | os.PathLike, options: CompressOptions, progress: ProgressFn | None = None
) -> Inspection:
    """Spectrum statistics of the layers `options.targets` chooses in the checkpoint at `path`
    (a Hub name: from the local cache)."""
    path = resolve_model(path, options.load.revision)
    exported = path.is_dir() and is_export(path)
    targets, notices = _export_layers(path, options) if exported else _dense(path, options)
    spectra = layer_spectra(targets, progress)
    ranks = {n: m.rank for n, m in targets.items()} if exported else None
    rows = []
    for name, s in spectra.items():
        row = spectrum_stats(name, tuple(dense_weight_of(targets[name]).shape), s).to_dict()
        rows.append({**row, **({"rank": ranks[name]} if ranks else {})})
    return Inspection(rows, spectra, ranks, notices)


def _dense(path: Path, options: CompressOptions) -> tuple[dict[str, nn.Module], list[str]]:
    loaded = load(path, options.load)
    return select_targets(loaded, options), loaded.notices


def _export_layers(path: Path, options: CompressOptions) -> tuple[dict[str, nn.Module], list[str]]:
    from compressor.core.surgery import factorized_layers
    from compressor.io.load import load_pretrained

    model = load_pretrained(path)
    check_patterns(model, options.targets)
    layers = {n: m for n, m in factorized_layers(model).items() if options.targets.chooses(n)}
    if not layers:
        raise DlncError(f"{path}: a dlnc export with no factorized layer to inspect")
    return layers, [f"{path} is a dlnc export: the spectra are those of its factors up @ down"]
