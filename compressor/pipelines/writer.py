"""The export's weight shards written tensor by tensor: untouched tensors copied from the
checkpoint, each factorized layer's factors produced (by the executor's factor function) while
a worker thread already produces the next one. Keys, order, sharding and metadata are the
in-memory export's, so both paths write the same files."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from compressor.core.compress import LayerReport, dense_report
from compressor.core.layers import FactorizedLinear, in_linear_layout
from compressor.core.linalg import breakeven_rank
from compressor.core.progress import ProgressFn
from compressor.core.ranks import factor_params
from compressor.core.surgery import replace_module, tied_keys
from compressor.io.export import export_state_dict, weights_metadata
from compressor.io.streaming import file_order, write_safetensors
from compressor.pipelines.source import LayerSpec, StreamedCheckpoint, WeightReader

__all__ = ["FactorOf", "ShardWriter", "factorize_skeleton", "shared_keys"]

FactorOf = Callable[[str, WeightReader, int], tuple[torch.Tensor, torch.Tensor, float]]
"""factor(name, read, rank) -> (up, down, relative error) of one streamed layer."""


def factorize_skeleton(model: nn.Module, layers: dict[str, LayerSpec]) -> None:
    """Put meta `FactorizedLinear`s of the chosen ranks in the tree: the export's keys,
    shapes and `dlnc` section then come from the in-memory path's own functions."""
    for name, t in layers.items():
        if t.decision.dense:
            continue
        out_f, in_f = t.shape
        layer = FactorizedLinear(
            in_f, out_f, t.decision.rank, 2, t.bias, dtype=t.dtype, device="meta",
        )  # fmt: skip
        layer.layout = t.layout
        replace_module(model, name, layer)


class ShardWriter:
    """The output shards, tensor by tensor, in the in-memory export's order and sharding."""

    def __init__(
        self,
        ckpt: StreamedCheckpoint,
        layers: dict[str, LayerSpec],
        factor: FactorOf,
        format: str,
        max_shard_size: str,
        progress: ProgressFn | None,
    ) -> None:
        self.model, self.layers, self.keys = ckpt.loaded.model, layers, ckpt.keys
        self.ckpt, self.source = ckpt, ckpt.tensors
        self.factor, self.format, self.max_shard_size = factor, format, max_shard_size
        self.progress = progress
        self.reports: dict[str, LayerReport] = {}
        self.buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        self.owner = self._owners()
        self.total = len(set(self.owner.values()))
        self.pending: dict[str, Future] = {}
        self.done = 0
        self.threads = torch.get_num_threads()

    def _owners(self) -> dict[str, str]:
        """Output key -> the factorized layer that produces it."""
        owner = {}
        for name, t in self.layers.items():
            if not t.decision.dense:
                for leaf in ("weight", "bias", "down.weight", "up.weight", "up.bias"):
                    owner[f"{name}.{leaf}"] = name
        return owner

    def plan(self, shared: dict[str, str]) -> dict[str, torch.Tensor]:
        """The export's tensors as meta tensors (real shapes and dtypes), tied ones dropped."""
        plan = {}
        for key, meta in export_state_dict(self.model, self.format).items():
            if key in shared:
                continue
            src = self.keys.get(key)
            dtype = self.source.specs[src].dtype if src in self.source else meta.dtype
            if key in self.buffers and src is None:
                dtype = self.buffers[key].dtype
            plan[key] = torch.empty(meta.shape, dtype=dtype, device="meta")
        return plan

    def write(self, folder: Path) -> None:
        from huggingface_hub import constants, split_torch_state_dict_into_shards

        shared = shared_keys(self.model)
        plan = self.plan(shared)
        split = split_torch_state_dict_into_shards(plan, max_shard_size=self.max_shard_size)
        files = {
            filename: {n: (tuple(plan[n].shape), plan[n].dtype) for n in names}
            for filename, names in split.filename_to_tensors.items()
        }
        written = [n for specs in files.values() for n in file_order(specs)]
        self.queue = iter(dict.fromkeys(self.owner[k] for k in written if k in self.owner))
        for name, t in self.layers.items():
            if t.decision.dense:
                self.reports[name] = dense_report(name, t.shape, t.decision.reason)
        metadata = {**weights_metadata(), **shared}
        per_file = {"format": "pt"} if split.is_sharded else metadata  # as huggingface_hub's
        with ThreadPoolExecutor(1) as self.pool:
            self._submit_next()
            for filename, specs in files.items():
                write_safetensors(folder / filename, specs, self._produce, per_file)
        if split.is_sharded:
            index = {
                "metadata": {**split.metadata, **metadata},
                "weight_map": split.tensor_to_filename,
            }
            name = constants.SAFETENSORS_WEIGHTS_FILE_PATTERN.format(suffix="") + ".index.json"
            _write_index(folder / name, index)

    def _submit_next(self) -> None:
        name = next(self.queue, None)
        if name is not None:
            self.pending[name] = self.pool.submit(self._factor, name)

    def _produce(self, key: str) -> torch.Tensor | Iterator[torch.Tensor]:
        name = self.owner.get(key)
        if name is None:
            src = self.keys.get(key)
            return self.source.pieces(src) if src is not None else self.buffers[key]
        while name not in self.pending:
            self._submit_next()
        tensors = self.pending[name].result()
        if len(self.pending) == 1:  # start the next layer while this one is written
            self._submit_next()
        out = tensors.pop(key)
        if not tensors:
            del self.pending[name]
            self.done += 1
            if self.progress:
                self.progress("factorize", self.done, self.total)
        return out

    def _factor(self, name: str) -> dict[str, torch.Tensor]:
        """The export tensors of one factorized layer, and its report."""
        torch.set_num_threads(self.threads)  # a new thread starts with the default count
        t = self.layers[name]
        rank = t.decision.rank
        up, down, rel = self.factor(name, self.ckpt.reader(name, t, checked=False), rank)
        up, down = up.to(t.dtype), down.to(t.dtype)
        bias = self.source.get(t.bias_key).to(t.dtype) if t.bias_key else None
        self.reports[name] = LayerReport(
            name, t.shape, rank, factor_params(t.shape, None), factor_params(t.shape, rank),
            rel, breakeven_rank(*t.shape),
        )  # fmt: skip
        if self.format == "factors":
            out = {f"{name}.down.weight": down, f"{name}.up.weight": up}
            if bias is not None:
                out[f"{name}.up.bias"] = bias
            return out
        wide = torch.promote_types(t.dtype, torch.float32)
        dense = (up.to(wide) @ down.to(wide)).to(t.dtype)
        out = {f"{name}.weight": in_linear_layout(dense, t.layout)}
        if bias is not None:
            out[f"{name}.bias"] = bias
        return out


def shared_keys(model: nn.Module) -> dict[str, str]:
    """Keys whose parameter is shared with another key -> the key kept in their place, chosen
    as huggingface_hub's save_torch_state_dict chooses (the first name not among the tied
    keys); the in-memory export drops the same ones and records them in its metadata."""
    groups: dict[int, list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(key)
    tied = set(tied_keys(model))
    dropped = {}
    for group in (sorted(g) for g in groups.values() if len(g) > 1):
        keep = next((k for k in group if k not in tied), group[0])
        dropped.update({k: keep for k in group if k != keep})
    return dropped


def _write_index(path: Path, index: dict) -> None:
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
