"""Block by block from a checkpoint on disk, with calibration data: one block's weights loaded
at a time onto the meta skeleton, the original model's hidden states carried from block to
block (on disk past a share of the memory).

`whiten_pass` (pass 1 with data): each target's input Gram, its whitener (kept on disk, one
file per distinct Gram) and its whitened spectrum, as the in-memory `whiten` plan computes
them; large layers (`Solver.large`) go the float32 way, their Gram reductions kept for pass 2.
Given the output sensitivity (`pipelines.sensitivity`), also the output-aware gains and factors
of the in-memory plan (`methods.output_aware`).
`correct_pass`: block by block once more, each block's targets factorized and refit on the
compressed model's own inputs (`methods.sequential.correct_streamed`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor.core.compress import check_finite
from compressor.core.gram import RANDOMIZED_TOL, gram_singular_values
from compressor.core.layers import FactorizedLinear, in_linear_layout, layout_of
from compressor.core.linalg import truncation_error
from compressor.core.progress import ProgressFn
from compressor.core.solver import Solver
from compressor.io.streaming import module_loader
from compressor.pipelines.source import (
    LayerSpec,
    NotStreamable,
    StreamedCheckpoint,
    WeightReader,
    release,
)
from compressor.pipelines.writer import FactorOf

__all__ = ["correct_pass", "whiten_pass"]


def _single(solver: Solver, shape: tuple[int, ...], whitener) -> bool:
    """Whitened in float32: a large layer whose whitener is float32."""
    float32 = whitener is not None and whitener.root.dtype == torch.float32
    return float32 and solver.large(shape)


def _spectrum(solver: Solver, name: str, whitened: torch.Tensor) -> torch.Tensor:
    """The singular values of a whitened weight, its Gram reduction kept when the solver keeps
    them."""
    if solver.kept is None:
        return gram_singular_values(whitened, None)
    return solver.kept.spectrum(name, whitened, None)


def _basis(solver: Solver, name: str, rank: int):
    return solver.kept.basis(name, rank) if solver.kept is not None else None


def whiten_pass(
    ckpt: StreamedCheckpoint,
    layers: dict[str, LayerSpec],
    data,
    damping: float,
    solver: Solver,
    tmp: Path,
    spill_over: int,
    progress: ProgressFn | None,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
):
    """1) with data: block by block, each target's input Gram, its whitener (saved beside the
    kept reductions, one file per distinct Gram) and its whitened spectrum, as `build_plan`
    computes them. With `sensitivity` (`pipelines.sensitivity`), the output-aware gains too,
    s(D W L)^2, and the output-aware factors (float64), as the in-memory plan's
    `Whiten.output_aware`. With the `auto` solver, large layers (`_large`) go the float32 way,
    as the data-free path does: a float32 whitener, the spectrum of W L from its Gram matrix, whose
    reduction `kept` keeps for pass 2's basis; the factors are held to the optimum within
    `RANDOMIZED_TOL` (else the exact float64 factors). Returns the spectra, pass 2's factor
    function and the gains (None without `sensitivity`)."""
    from compressor.core.whitening import Whitener, whitened_spectrum
    from compressor.methods.blocks import block_grams, stream_blocks
    from compressor.methods.output_aware import channel_weights, output_whitened_spectrum

    model = ckpt.loaded.model
    targets = {n: model.get_submodule(n) for n in layers}
    spectra, files, gains = {}, {}, {}
    channels = {n: channel_weights(s) for n, s in (sensitivity or {}).items()}
    load = module_loader(ckpt.tensors, ckpt.keys)
    single_from = solver.large_from if solver.solver == "auto" else None  # as `Solver.large`
    blocks = stream_blocks(model, data, load, tmp, progress, spill_over)
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
                torch.save(whitener_state(held[1]), paths[id(st)])
            elif held is None or held[0] != id(st):  # sharers are read one after another
                held = (id(st), load_whitener(paths[id(st)]))
            files[name] = paths[id(st)]
            whitener = held[1]
            weight = in_linear_layout(targets[name].weight, layout_of(targets[name]))
            check_finite(name, weight)
            if _single(solver, weight.shape, whitener):
                spectra[name] = _spectrum(solver, name, whitener.whiten(weight))
            else:
                spectra[name] = whitened_spectrum(weight, whitener)
            if channels:
                gains[name] = output_whitened_spectrum(weight, whitener, channels[name]).square()
        whitener = held = weight = None  # none of it while the next block's Grams are made
    missing = [n for n in targets if n not in spectra]
    if missing:
        raise NotStreamable(f"{missing[0]} is outside the model's block stack")
    release(model)

    factor = _factor_fn(solver, spectra, files, channels)
    return spectra, factor, gains if channels else None


def _factor_fn(solver: Solver, spectra: dict, files: dict[str, Path], channels: dict):
    """Pass 2's factors of the whiten pass: the whitener saved in pass 1 (`files`), the weight
    read again; output-aware with `channels` (D's diagonal per layer)."""
    from compressor.core.whitening import whitened_factors, whitened_gram_factors
    from compressor.methods.output_aware import output_whitened_factors

    def factor(name: str, read: WeightReader, rank: int):
        whitener = load_whitener(files[name])
        weight = read()
        if channels:  # in float64, as in memory
            return output_whitened_factors(weight, whitener, channels[name], rank)
        if _single(solver, weight.shape, whitener):
            basis = _basis(solver, name, rank)
            up, down, top = whitened_gram_factors(weight, whitener, rank, basis)
            total = float(spectra[name].double().square().sum())
            error = max(total - float(top.double().square().sum()), 0.0) ** 0.5
            if error <= (1 + RANDOMIZED_TOL) * truncation_error(spectra[name], rank):
                return up, down, error / max(total**0.5, 1e-30)
        up, down, _, rel = whitened_factors(weight, whitener, rank)
        return up, down, rel

    return factor


def correct_pass(
    ckpt: StreamedCheckpoint,
    layers: dict[str, LayerSpec],
    factor: FactorOf,
    data,
    damping: float,
    depth: int,
    tmp: Path,
    spill_over: int,
    progress: ProgressFn | None,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
):
    """With error correction: block by block once more, each block's targets factorized
    (`factor`, the one-shot fit) and refit on the compressed model's own inputs
    (`correct_streamed`; with `sensitivity`, in the output-aware metric, as in memory); their
    final factors wait in `tmp` for the writer. Returns the
    writer's factor function (the relative errors are the one-shot fit's, as in memory) and
    what the correction did."""
    from compressor.methods.sequential import correct_streamed

    folder = Path(tmp)
    errors: dict[str, float] = {}

    def factorize(name: str, dense: nn.Module) -> FactorizedLinear:
        rank = layers[name].decision.rank
        up, down, errors[name] = factor(name, ckpt.reader(name, layers[name], False), rank)
        return FactorizedLinear.from_dense(dense, rank, depth, factors=(up, down))

    def done_with(name: str, layer: FactorizedLinear) -> None:
        tensors = {"up": layer.collapsed_up().to(layer.up.weight), "down": layer.down.weight}
        save_file({k: v.contiguous() for k, v in tensors.items()}, _factors_file(folder, name))

    targets = [n for n, t in layers.items() if not t.decision.dense]
    load = module_loader(ckpt.tensors, ckpt.keys)
    done = correct_streamed(
        ckpt.loaded.model, targets, data, load, factorize, done_with, damping,
        progress=progress, spill_dir=folder, spill_over=spill_over, sensitivity=sensitivity,
    )  # fmt: skip
    release(ckpt.loaded.model)

    def corrected(name: str, read: WeightReader, rank: int):
        path = _factors_file(folder, name)
        if not path.exists():  # no layer could be refit: no block ran
            return factor(name, read, rank)
        with safe_open(path, framework="pt") as h:
            return h.get_tensor("up"), h.get_tensor("down"), errors[name]

    return corrected, done


def _factors_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.factors.safetensors"


def whitener_state(whitener) -> dict[str, torch.Tensor]:
    if whitener is None:
        return {}
    state = {"root": whitener.root, "lower": whitener.lower}
    return state if whitener.pinv is None else state | {"pinv": whitener.pinv}


def load_whitener(path: Path):
    from compressor.core.whitening import Whitener

    state = torch.load(path, weights_only=True)
    return Whitener(**state) if state else None
