"""Data-free compression of a checkpoint larger than memory, one tensor at a time.

The model's module tree is built on the meta device (no weights), so targets, recipes and
rank overrides are chosen exactly as in memory. Then two passes over the targeted weights:
  1) read each weight, take its spectrum, release it; allocate the ranks (a global `keep`
     budget needs every spectrum first);
  2) write the output shards tensor by tensor: untouched tensors are copied, each targeted
     weight is read again and decomposed at its rank (on large layers the cheaper of a
     randomized SVD and the float32 Gram's eigenvectors, checked against the optimum; exact
     otherwise) while a worker thread already reads and decomposes the next one.
With data (`--method whiten`), pass 1 is block by block instead (`_whiten_pass`: input Grams,
whiteners kept on disk, spectra), and with error correction a pass between the two refits
each block's layers on the compressed model's own inputs (`_correct_pass`).
Peak memory: about two layers' working sets (the one being decomposed, the factors being
written) plus a fixed overhead, never the model. The export (tensors, shards, config.json's
`dlnc` section, report.json) is the in-memory path's, bit for bit with `solver="exact"`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.core.compress import CompressionReport, LayerReport, check_finite, dense_report
from compressor.core.layers import FactorizedLinear, in_linear_layout, layout_of
from compressor.core.linalg import (
    RANDOMIZED_MIN_SIZE,
    RANDOMIZED_TOL,
    Tridiagonal,
    breakeven_rank,
    decompose,
    factors_from,
    gram_factors,
    gram_singular_values,
    gram_tridiagonal,
    randomized_factors,
    resolve_device,
    singular_values,
    truncation_error,
    use_randomized,
)
from compressor.core.progress import ProgressFn
from compressor.core.ranks import LayerRank, allocate_ranks, factor_params
from compressor.core.surgery import count_params, replace_module, tied_keys
from compressor.errors import DlncError
from compressor.io.checkpoint import (
    LoadedCheckpoint,
    check_loading_info,
    model_class,
    read_config,
    weight_files,
)
from compressor.io.export import dlnc_section, export_state_dict, write_folder
from compressor.io.streaming import (
    TensorSource,
    file_order,
    meta_model,
    module_loader,
    return_freed_memory,
    write_safetensors,
)
from compressor.io.tensor_model import TensorModel

__all__ = ["SOLVERS", "NotStreamable", "open_streamed", "stream_compress"]

SOLVERS = ("auto", "exact", "randomized")
"""auto: on large layers the cheaper of a randomized SVD (ranks well below the layer's size)
and the float32 Gram route, held to the optimum; exact on small layers or when they miss it."""


class NotStreamable(Exception):
    """This checkpoint or these options need the in-memory path (the message says why)."""


@dataclass
class _Target:
    """One targeted layer: where its tensors are and what was decided for it."""

    weight_key: str
    bias_key: str | None
    shape: tuple[int, int]  # (out, in), the nn.Linear layout
    layout: str
    dtype: torch.dtype
    bias: bool
    decision: LayerRank | None = None


@dataclass(frozen=True)
class _Reader:
    """A targeted weight (Linear layout), read from the checkpoint each time it is called and
    checked for NaN/Inf as it is read (unless `checked` is off: pass 1 has checked it): the
    decompositions read it when they need it and do not hold it in between."""

    source: TensorSource
    name: str  # the layer, for the NaN/Inf error
    key: str
    layout: str
    shape: tuple[int, int]
    checked: bool = True

    def __call__(self) -> torch.Tensor:
        weight = in_linear_layout(self.source.get(self.key), self.layout)
        if self.checked:
            check_finite(self.name, weight)
        return weight

    def row_blocks(self, rows: int) -> Iterator[torch.Tensor]:
        """The weight's rows (Linear layout) `rows` at a time, read piece by piece."""
        if self.layout == "linear":
            piece = rows * self.source.specs[self.key].nbytes // self.shape[0]
            return self._checked(self.source.pieces(self.key, piece))
        return self._checked(self.source.columns(self.key, rows))  # stored transposed

    def column_blocks(self, columns: int) -> Iterator[torch.Tensor]:
        """W^T's rows (the weight's columns, Linear layout) `columns` at a time."""
        if self.layout == "linear":
            return self._checked(self.source.columns(self.key, columns))
        piece = columns * self.source.specs[self.key].nbytes // self.shape[1]
        return self._checked(self.source.pieces(self.key, piece))

    def _checked(self, blocks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for block in blocks:
            if self.checked:
                check_finite(self.name, block)
            yield block


def _reader(source: TensorSource, name: str, t: _Target, checked: bool = True) -> _Reader:
    return _Reader(source, name, t.weight_key, t.layout, t.shape, checked)


def stream_compress(path: str | os.PathLike, out: Path, options, progress: ProgressFn | None):
    """`compress_checkpoint` for data-free compression, streamed (see the module docstring).

    Raises `NotStreamable` before writing anything when the checkpoint needs the in-memory
    path (pickle weights, keys the model does not name, an architecture without a class)."""
    from compressor.workflows.compress import (
        CompressResult,
        build_report,
        expand_overrides,
        record_correction,
        select_targets,
    )

    loaded, source, keys = open_streamed(path, options)
    return_freed_memory()  # memory bounded by one layer, not by what malloc keeps
    total_before = count_params(loaded.model)
    targets = select_targets(loaded, options)
    layers = {n: _target(n, m, keys, source) for n, m in targets.items()}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.grams-", dir=_parent(out)) as tmp:
        world = _world() if options.data_free else None
        if world is not None and options.run.device is None and world.device.type == "cuda":
            options = replace(options, device=str(world.device))  # one GPU per process
        kept = _Reductions.planned(layers, source, options, Path(tmp), loaded.notices)
        if options.data_free:
            spectra = _spectra_shared(layers, source, options, progress, world, kept)
            method, weight_spectra, factor = "svd", spectra, _svd_factor(spectra, options, kept)
        else:
            method = "whiten"
            grams = _whiten_pass(loaded, layers, source, keys, options, Path(tmp), kept, progress)
            spectra, weight_spectra, factor = grams
        policy = expand_overrides(options.policy, list(layers))
        shapes = {n: t.shape for n, t in layers.items()}
        for name, decision in allocate_ranks(spectra, shapes, policy).items():
            layers[name].decision = decision
        correction = None
        if method == "whiten" and options.method.correct:
            factor, correction = _correct_pass(
                loaded, layers, source, keys, factor, options, tmp, progress
            )
        _factorize_skeleton(loaded.model, layers)
        if world is not None:  # each process factorizes its share; the main one writes
            factor = _factor_shared(layers, source, factor, out, world)
            if not world.is_main_process:
                world.wait_for_everyone()
                return CompressResult(Path(out).resolve(), {}, loaded.notices, weight_spectra)
        writer = _Writer(loaded.model, layers, keys, source, factor, options, progress)
        section = dlnc_section(loaded.model, method, options.export.merge, loaded.tensor_mode)
        summary: dict = {}

        def report() -> dict:  # the per-layer errors are known once the factors are written
            done = CompressionReport(method, [writer.reports[n] for n in layers], options.depth)
            summary.update(build_report(loaded, done, total_before, options))
            if correction is not None:
                record_correction(summary, correction, loaded.notices)
            return summary

        try:
            done = write_folder(
                out, writer.write, config=loaded.config, section=section, source=loaded.source,
                report=report, overwrite=options.export.overwrite,
            )  # fmt: skip
        finally:
            if world is not None:
                shutil.rmtree(_parts_dir(out), ignore_errors=True)
                world.wait_for_everyone()
    summary = json.loads((done / "report.json").read_text())  # with bytes_after filled in
    return CompressResult(done, summary, loaded.notices, weight_spectra)


def _world():
    """accelerate's process state under torchrun / accelerate launch (several processes split
    the layers between them); None in a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from compressor.training.evaluate import cpu_launch

    return PartialState(cpu=cpu_launch())


def _spectra_shared(layers, source, options, progress, world, kept) -> dict[str, torch.Tensor]:
    """1) the spectra; with several processes each takes every n-th layer (`_mine`), then all
    gather."""
    if world is None:
        return _spectra(layers, source, options, progress, kept)
    from accelerate.utils import gather_object

    names = list(layers)
    mine = {n: layers[n] for n in _mine(names, world)}
    merged = {
        k: v
        for part in gather_object([_spectra(mine, source, options, None, kept)])
        for k, v in part.items()
    }
    return {n: merged[n] for n in names}


def _mine(names: list[str], world) -> list[str]:
    """The layers one of several processes decomposes: every n-th."""
    return names[world.process_index :: world.num_processes]


def _parts_dir(out: Path) -> Path:
    return _parent(out) / f".{Path(out).name}.parts"


def _factor_shared(layers, source, factor: FactorOf, out: Path, world) -> FactorOf:
    """2) with several processes: each factorizes every n-th layer into a parts folder beside
    the output; the main process's writer then reads the factors from there."""
    parts = _parts_dir(out)
    if world.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir()
    world.wait_for_everyone()
    for name in _mine(list(layers), world):  # the layers whose pass 1 it ran (reductions)
        t = layers[name]
        if t.decision.dense:
            continue
        up, down, rel = factor(name, _reader(source, name, t, checked=False), t.decision.rank)
        tensors = {"up": up.contiguous(), "down": down.contiguous()}
        save_file(tensors, parts / f"{name}.safetensors", metadata={"rel": repr(rel)})
    world.wait_for_everyone()

    def read(name: str, weight: torch.Tensor, rank: int):
        with safe_open(parts / f"{name}.safetensors", framework="pt") as h:
            return h.get_tensor("up"), h.get_tensor("down"), float(h.metadata()["rel"])

    return read


def _whitener_state(whitener) -> dict[str, torch.Tensor]:
    if whitener is None:
        return {}
    state = {"root": whitener.root, "lower": whitener.lower}
    return state if whitener.pinv is None else state | {"pinv": whitener.pinv}


def _load_whitener(path: Path):
    from compressor.methods.whiten import Whitener

    state = torch.load(path, weights_only=True)
    return Whitener(**state) if state else None


def _release(model: nn.Module) -> None:
    """Send the parameters the block loop loaded back to the meta device, and re-tie."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and not p.is_meta:
                module._parameters[key] = nn.Parameter(p.to("meta"), requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _parent(out: Path) -> Path:
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


FactorOf = Callable[[str, _Reader, int], tuple[torch.Tensor, torch.Tensor, float]]
"""factor(name, read, rank) -> (up, down, relative error) of one streamed layer."""


def _svd_factor(spectra: dict[str, torch.Tensor], options, kept: _Reductions) -> FactorOf:
    def factor(name: str, read: _Reader, rank: int):
        return _factors(read, rank, spectra[name], options, kept.basis(name, rank))

    return factor


class _Reductions:
    """Pass 1's tridiagonal reductions of the large layers' Gram matrices (`Tridiagonal`),
    kept on disk for pass 2, which then takes its singular vectors from them instead of
    forming and reducing each Gram matrix again (a third of the time on a CPU). Kept for
    the `auto` solver on a CPU (on a GPU recomputing is cheaper than the disk), when the disk
    beside the output has room for them (half a float32 Gram matrix each) and the export."""

    def __init__(self, folder: Path | None, sizes: dict[str, int]) -> None:
        self.folder, self.sizes = folder, sizes

    @classmethod
    def planned(cls, layers, source: TensorSource, options, folder: Path, notices):
        if options.run.solver != "auto" or resolve_device(options.run.device).type != "cpu":
            return cls(None, {})
        sizes = {n: min(t.shape) for n, t in layers.items() if _large(options, t.shape)}
        need = sum(4 * (n * n // 2 + 3 * n) for n in sizes.values())
        export = sum(spec.nbytes for spec in source.specs.values())  # at most the input's
        free = shutil.disk_usage(folder).free
        if need + export > free:
            notices.append(
                f"{need / 1e9:.1f} GB of Gram reductions would not fit on the disk beside "
                f"the output with the export ({free / 1e9:.1f} GB free): each Gram matrix "
                "is formed and reduced twice (about 1.5x the time)"
            )
            return cls(None, {})
        return cls(folder, sizes)

    def spectrum(self, name: str, read: _Reader, device) -> torch.Tensor:
        """Pass 1: the layer's singular values, its reduction saved when kept."""
        if self.folder is None or name not in self.sizes:
            return gram_singular_values(read, device)
        reduced, _ = gram_tridiagonal(read)
        values = reduced.eigenvalues()
        reduced.save(self._path(name))
        return values.clamp_min(0).sqrt()

    def basis(self, name: str, rank: int) -> torch.Tensor | None:
        """Pass 2: the top `rank` singular vectors of the layer's smaller side, or None if
        its reduction was not kept (here: another process's layer)."""
        path = self._path(name) if self.folder is not None else None
        if path is None or not path.exists():
            return None
        return Tridiagonal.load(path, self.sizes[name]).eigen(rank)[1]

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.tridiagonal"


def _whiten_pass(loaded, layers, source, keys, options, tmp: Path, kept: _Reductions, progress):
    """1) with data: block by block, each target's input Gram, its whitener (saved beside the
    kept reductions, one file per distinct Gram) and its whitened spectrum, as `build_plan`
    computes them. With the `auto` solver, large layers (`_large`) go the float32 way, as the
    data-free path does: a float32 whitener, the spectrum of W L from its Gram matrix, whose
    reduction `kept` keeps for pass 2's basis; the factors are held to the optimum within
    `RANDOMIZED_TOL` (else the exact float64 factors). The weights' own spectra (the result's
    `spectra`, for plots) are computed only when asked for."""
    from compressor.methods.blocks import block_grams, stream_blocks
    from compressor.methods.whiten import (
        Whitener,
        whitened_factors,
        whitened_gram_factors,
        whitened_spectrum,
    )
    from compressor.training.data import load_data

    targets = {n: loaded.model.get_submodule(n) for n in layers}
    batches = load_data(options.method.data, loaded.source).train
    damping = options.method.damping
    spectra, files = {}, {}
    load = module_loader(source, keys)
    single_from = RANDOMIZED_MIN_SIZE if options.run.solver == "auto" else None  # as `_large`
    blocks = stream_blocks(loaded.model, batches, load, tmp, progress, _spill_over())
    for block in blocks:
        paths: dict[int, Path] = {}
        held: tuple[int, Whitener | None] | None = None  # one whitener in memory at a time
        for name, st in block_grams(block, targets, single_from).items():
            if id(st) not in paths:  # q/k/v share one Gram, one whitener
                rows = max(st.rows, 1)  # a large layer's float32 Gram is its whitener's scratch
                gram = st.gram.div_(rows) if st.gram.dtype == torch.float32 else st.gram / rows
                st.gram = torch.empty(0)  # only its whitener is used from here
                whitener = held = None  # the previous whitener goes before the next is made
                held = (id(st), Whitener.from_gram(gram, damping))
                del gram
                paths[id(st)] = tmp / f"{block.index}-{len(paths)}.whitener"
                torch.save(_whitener_state(held[1]), paths[id(st)])
            elif held is None or held[0] != id(st):  # sharers are read one after another
                held = (id(st), _load_whitener(paths[id(st)]))
            files[name] = paths[id(st)]
            whitener = held[1]
            weight = in_linear_layout(targets[name].weight, layout_of(targets[name]))
            check_finite(name, weight)
            if _single(options, weight.shape, whitener):
                spectra[name] = kept.spectrum(name, whitener.whiten(weight), None)
            else:
                spectra[name] = whitened_spectrum(weight, whitener)
        whitener = held = weight = None  # none of it while the next block's Grams are made
    missing = [n for n in targets if n not in spectra]
    if missing:
        raise NotStreamable(f"{missing[0]} is outside the model's block stack")
    _release(loaded.model)

    def factor(name: str, read: _Reader, rank: int):
        whitener = _load_whitener(files[name])
        weight = read()
        if _single(options, weight.shape, whitener):
            basis = kept.basis(name, rank)
            up, down, top = whitened_gram_factors(weight, whitener, rank, basis)
            total = float(spectra[name].double().square().sum())
            error = max(total - float(top.double().square().sum()), 0.0) ** 0.5
            if error <= (1 + RANDOMIZED_TOL) * truncation_error(spectra[name], rank):
                return up, down, error / max(total**0.5, 1e-30)
        up, down, _, rel = whitened_factors(weight, whitener, rank)
        return up, down, rel

    readers = {n: _reader(source, n, t, checked=False) for n, t in layers.items()}
    return spectra, _WeightSpectra(readers, options), factor


class _WeightSpectra(Mapping[str, torch.Tensor]):
    """Each target's singular values (as the data-free pass computes them), read from the
    checkpoint when first asked for: streamed whitening ranks by the whitened spectra, and a
    7B layer's own spectra cost 17 s that only a plot reads."""

    def __init__(self, readers: dict[str, _Reader], options) -> None:
        self.readers, self.options, self.known = readers, options, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.known:
            read = self.readers[name]
            large = _large(self.options, read.shape)
            self.known[name] = gram_singular_values(read) if large else singular_values(read())
        return self.known[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


def _correct_pass(loaded, layers, source, keys, factor: FactorOf, options, tmp, progress):
    """With error correction: block by block once more, each block's targets factorized
    (`factor`, the one-shot fit) and refit on the compressed model's own inputs
    (`correct_streamed`); their final factors wait in `tmp` for the writer. Returns the
    writer's factor function (the relative errors are the one-shot fit's, as in memory) and
    what the correction did."""
    from compressor.methods.sequential import correct_streamed
    from compressor.training.data import load_data

    folder = Path(tmp)
    errors: dict[str, float] = {}

    def factorize(name: str, dense: nn.Module) -> FactorizedLinear:
        rank = layers[name].decision.rank
        up, down, errors[name] = factor(name, _reader(source, name, layers[name], False), rank)
        return FactorizedLinear.from_dense(dense, rank, options.depth, factors=(up, down))

    def done_with(name: str, layer: FactorizedLinear) -> None:
        tensors = {"up": layer.collapsed_up().to(layer.up.weight), "down": layer.down.weight}
        save_file({k: v.contiguous() for k, v in tensors.items()}, _factors_file(folder, name))

    targets = [n for n, t in layers.items() if not t.decision.dense]
    batches = load_data(options.method.data, loaded.source).train
    load = module_loader(source, keys)
    done = correct_streamed(
        loaded.model, targets, batches, load, factorize, done_with, options.method.damping,
        progress=progress, spill_dir=folder, spill_over=_spill_over(),
    )  # fmt: skip
    _release(loaded.model)

    def corrected(name: str, read: _Reader, rank: int):
        path = _factors_file(folder, name)
        if not path.exists():  # no layer could be refit: no block ran
            return factor(name, read, rank)
        with safe_open(path, framework="pt") as h:
            return h.get_tensor("up"), h.get_tensor("down"), errors[name]

    return corrected, done


def _factors_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.factors.safetensors"


def _spill_over() -> int:
    """Bytes of one block's calibration activations kept in memory before they go to disk
    (beside the output): an eighth of the memory available now (up to three sets are alive
    at once with error correction, one block's weights and statistics beside them)."""
    from compressor.workflows.compress import available_memory

    return available_memory() // 8


def _large(options, shape: tuple[int, ...]) -> bool:
    """A layer (or Gram matrix) the `auto` solver takes the float32 way."""
    return options.run.solver == "auto" and min(shape) >= RANDOMIZED_MIN_SIZE


def _single(options, shape: tuple[int, ...], whitener) -> bool:
    """Whitened in float32: a large layer whose whitener is float32."""
    return whitener is not None and whitener.root.dtype == torch.float32 and _large(options, shape)


def open_streamed(
    path: str | os.PathLike, options
) -> tuple[LoadedCheckpoint, TensorSource, dict[str, str | None]]:
    """The checkpoint's module tree on the meta device, its tensors' index, and which
    checkpoint key holds each state-dict key (`NotStreamable` when they do not match)."""
    loaded, source = _open(Path(path), options)
    keys = _key_map(loaded.model, source)
    _check_tensors(loaded, source, keys)
    return loaded, source, keys


def _open(path: Path, options) -> tuple[LoadedCheckpoint, TensorSource]:
    """The checkpoint's module tree on the meta device and its tensors' index."""
    if not path.exists():
        raise DlncError(f"{path}: no such file or folder")
    folder, files = weight_files(path, options.load.allow_pickle)
    if any(f.suffix != ".safetensors" for f in files):
        raise NotStreamable("pickle weights are read whole")
    source = TensorSource(files)
    config_file = Path(options.load.config) if options.load.config else folder / "config.json"
    if options.load.config and not config_file.is_file():
        raise DlncError(f"{config_file}: no such config file")
    if options.load.tensor_mode or not config_file.is_file():
        notices = [] if options.load.tensor_mode else [_tensor_mode_notice(path)]
        model = TensorModel(source.meta_state())
        return LoadedCheckpoint(model, folder, files, None, notices), source
    config = read_config(config_file, options.load.trust_remote_code)
    cls = model_class(config, options.load.trust_remote_code)
    if cls is None or not hasattr(cls, "config_class"):
        raise NotStreamable("config.json names no model class")
    return LoadedCheckpoint(meta_model(cls, config), folder, files, config, []), source


def _tensor_mode_notice(path: Path) -> str:
    return f"no config.json beside {path.name}: tensor mode (2-D weights only)"


def _key_map(model: nn.Module, source: TensorSource) -> dict[str, str | None]:
    """Model state-dict key -> checkpoint key (None: a buffer the model computes itself).

    Checkpoints saved from the base model lack (or have extra) `base_model_prefix.`; any other
    renaming is left to transformers' loader (the in-memory path)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    buffers = dict(model.named_buffers())
    tied = set(tied_keys(model))
    found: dict[str, str | None] = {}
    for key in model.state_dict():
        candidates = [key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")] if prefix else [key]
        hit = next((c for c in candidates if c in source), None)
        if hit is None and key not in buffers and key not in tied:
            raise NotStreamable(f"the checkpoint has no tensor {key}")
        found[key] = hit
    return found


def _check_tensors(loaded: LoadedCheckpoint, source: TensorSource, keys) -> None:
    """The in-memory path's loading checks (`check_loading_info`), from the files' headers: a
    tensor of the wrong shape, or tensors of a layer the config does not have, are errors;
    other unused tensors a notice."""
    state = loaded.model.state_dict()
    mismatched = [
        (key, source.specs[src].shape, tuple(state[key].shape))
        for key, src in keys.items()
        if src is not None and tuple(source.specs[src].shape) != tuple(state[key].shape)
    ]
    used = set(keys.values())
    unexpected = [k for k in source.specs if k not in used]
    info = {"mismatched_keys": mismatched, "unexpected_keys": unexpected}
    check_loading_info(loaded.model, info, loaded.notices)


def _target(name: str, module: nn.Module, keys, source: TensorSource) -> _Target:
    layout = layout_of(module)
    weight_key = keys[f"{name}.weight"]
    spec = source.specs[weight_key]
    stored = tuple(module.weight.shape)
    if spec.shape != stored:
        raise DlncError(f"weights do not match the config: shape mismatch at {weight_key}")
    shape = (stored[1], stored[0]) if layout == "conv1d" else stored
    has_bias = module.bias is not None
    bias_key = keys.get(f"{name}.bias") if has_bias else None
    return _Target(weight_key, bias_key, shape, layout, spec.dtype, has_bias)


def _spectra(layers, source, options, progress, kept: _Reductions) -> dict[str, torch.Tensor]:
    """1) every target's singular values, exact (the in-memory path's own decomposition) on
    small layers or with `solver="exact"`, else from the float32 Gram matrix, whose reduction
    `kept` may keep. One weight at a time, read piece by piece: reading the next one meanwhile
    would save ~1% of the time (a read from the page cache is ~50 ms against seconds of
    decomposition) for a whole layer more of memory."""
    spectra = {}
    for i, (name, t) in enumerate(layers.items()):
        read = _reader(source, name, t)
        if options.run.solver == "exact" or min(t.shape) < RANDOMIZED_MIN_SIZE:
            spectra[name] = decompose(read(), 1).s
        else:  # NaN/Inf shows on the Gram matrix's diagonal: the pieces go unchecked
            try:
                spectra[name] = kept.spectrum(
                    name, replace(read, checked=False), options.run.device
                )
            except ValueError:
                read()  # the NaN/Inf error, naming the layer
                raise DlncError(f"{name}: weights too large for a float32 Gram matrix; "
                                "use the exact solver") from None  # fmt: skip
        if progress:
            progress("spectra", i + 1, len(layers))
    return spectra


def _factorize_skeleton(model: nn.Module, layers: dict[str, _Target]) -> None:
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


class _Writer:
    """2) the output shards, tensor by tensor, in the in-memory export's order and sharding."""

    def __init__(self, model, layers, keys, source, factor: FactorOf, options, progress) -> None:
        self.model, self.layers, self.keys, self.source = model, layers, keys, source
        self.factor, self.options, self.progress = factor, options, progress
        self.reports: dict[str, LayerReport] = {}
        self.buffers = {k: v.detach() for k, v in model.named_buffers()}
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
        for key, meta in export_state_dict(self.model, self.options.export.merge).items():
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

        shared = _shared_keys(self.model)
        plan = self.plan(shared)
        split = split_torch_state_dict_into_shards(
            plan, max_shard_size=self.options.export.max_shard_size
        )
        files = {
            filename: {n: (tuple(plan[n].shape), plan[n].dtype) for n in names}
            for filename, names in split.filename_to_tensors.items()
        }
        written = [n for specs in files.values() for n in file_order(specs)]
        self.queue = iter(dict.fromkeys(self.owner[k] for k in written if k in self.owner))
        for name, t in self.layers.items():
            if t.decision.dense:
                self.reports[name] = dense_report(name, t.shape, t.decision.reason)
        metadata = {"format": "pt", **shared}
        per_file = {"format": "pt"} if split.is_sharded else metadata
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
        up, down, rel = self.factor(name, _reader(self.source, name, t, checked=False), rank)
        up, down = up.to(t.dtype), down.to(t.dtype)
        bias = self.source.get(t.bias_key).to(t.dtype) if t.bias_key else None
        self.reports[name] = LayerReport(
            name, t.shape, rank, factor_params(t.shape, None), factor_params(t.shape, rank),
            rel, breakeven_rank(*t.shape),
        )  # fmt: skip
        if not self.options.export.merge:
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


def _factors(read: _Reader, rank: int, s: torch.Tensor, options, basis: torch.Tensor | None):
    """(up, down, relative error). `auto` on a large layer: from pass 1's singular vectors
    (`basis`) when kept, else the cheaper of the randomized SVD and the float32 Gram route;
    kept if it reaches the optimum within `RANDOMIZED_TOL`; else (and with `solver="exact"`)
    the in-memory path's exact factors."""
    shape, device = read.shape, options.run.device
    fast = None
    if options.run.solver == "auto" and basis is not None:
        fast = lambda: gram_factors(read, rank, device=device, basis=basis)  # noqa: E731
    elif options.run.solver == "randomized" or (
        options.run.solver == "auto" and use_randomized(shape, rank)
    ):
        fast = lambda: randomized_factors(read(), rank, device=device)  # noqa: E731
    elif options.run.solver == "auto" and min(shape) >= RANDOMIZED_MIN_SIZE:
        fast = lambda: gram_factors(read, rank, device=device)  # noqa: E731
    if fast is not None:
        total = float(s.double().square().sum())  # ||W||_F^2: pass 1 need not read it again
        up, down, top = fast()
        error = max(total - float(top.double().square().sum()), 0.0) ** 0.5
        optimum = truncation_error(s, rank)
        if options.run.solver == "randomized" or error <= (1 + RANDOMIZED_TOL) * optimum:
            return up, down, error / max(total**0.5, 1e-30)
    weight = read()
    d = decompose(weight, rank)
    up, down = factors_from(weight, d, rank)
    return up, down, truncation_error(d.s, rank) / max(float(d.s.norm()), 1e-30)


def _shared_keys(model: nn.Module) -> dict[str, str]:
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
    import json

    with open(path, "w") as f:
        json.dump(index, f, indent=2)
