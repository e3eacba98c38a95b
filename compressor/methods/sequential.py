"""Error-correcting calibration: refit each factorized layer on the inputs that the already
compressed layers before it produce, so that errors do not pile up along the depth.

One-shot whitening fits every layer to the *original* model's inputs X. In the compressed
model layer l sees X' instead (the earlier layers are approximations). Here, in forward
order, each factorized layer gets the factors minimising

    || D (W' X'^T - W X^T) ||_F        (D: per-channel output weights, identity by default)

i.e. its output on the inputs it really receives matches the original layer's output on the
original inputs. With C = X^T X' and G' = X'^T X' = L' L'^T (damped), the unconstrained
optimum is W* = W C G'^-1 and the rank-k one is W' = D^-1 trunc_k(D W C L'^-T) L'^+: closed
form, from two Gram-sized statistics per layer (docs/method.md 4 with a cross term).

Block by block (`correct_blocks`): the hidden states entering block i are kept twice, as the
original model computes them and as the compressed one does; inside the block, each group of
layers reading one tensor (q/k/v, gate/up) is refit in forward order, its inputs caught by
running the block with the original dense layers swapped back in (X) and as compressed (X').
Memory: the model, the two streams of activations and one layer's statistics, never a copy of
the model. The fit has in x in freedom per layer and can overfit, so a layer is refit only when
the data gives it `TOKENS_PER_FEATURE` calibration tokens per input feature, and when a refit on
the even calibration batches lowers its output error on the odd ones (then it is refit on all
of them); otherwise it keeps its one-shot factors (docs/data-aware.md).

`correct_streamed` is the same refit for a model whose tree is on the meta device: one block
loaded at a time (`stream_blocks`), the compressed model's hidden states carried beside the
original's, each block's layers factorized on the way and handed back once refit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear, dense_weight_of
from compressor.core.linalg import decompose, factors_from
from compressor.core.progress import ProgressFn
from compressor.core.surgery import swapped
from compressor.core.whitening import DEFAULT_DAMPING, Whitener
from compressor.methods.blocks import (
    Activations,
    Block,
    LoadFn,
    find_blocks,
    first_inputs,
    real_mask,
    stream_blocks,
)
from compressor.methods.calibration import real_rows
from compressor.methods.replays import Replays

__all__ = [
    "ALPHA",
    "TOKENS_PER_FEATURE",
    "Correction",
    "correct_blocks",
    "correct_streamed",
    "corrected_factors",
]

TOKENS_PER_FEATURE = 16
"""A layer is refit only with at least this many calibration tokens per input feature: on
MiniLM at keep 0.5 (benchmarks/error_correction.py, docs/data-aware.md) 16 never lost to
one-shot whitening; 4 (with the held-out check) gained cosine but lost probe accuracy."""

HELD_OUT = "the refit did not lower its output error on the held-out calibration batches"
"""Why a layer keeps its one-shot factors after the check: the refit is fitted on the even
calibration batches and kept only if it beats the one-shot factors on the odd ones."""

ALPHA = 0.5
"""The default blend of the cross term (`corrected_factors`' `alpha`): halfway between fitting
the original outputs (1) and the compressed model's own inputs (0) won on MiniLM with every
calibration size measured; the full correction overfits small calibration sets."""


def corrected_factors(
    w: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    d: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` (up, down) minimising ||D (W' X'^T - W X^T)||_F, float64.

    `cross` = X^T X' and `gram` = X'^T X' (in x in, the same row count in both), `d` the
    output channel weights (None: all ones). `alpha` < 1 blends the cross term towards
    G' (alpha 0: the one-shot whitened fit on X', ignoring where the original's outputs are)."""
    whitener = Whitener.from_gram(gram, damping)
    if whitener is None:  # the layer's inputs are all zero: nothing to fit
        raise ValueError("the layer received only zero inputs")
    w64 = w.detach().double()
    d = torch.ones(w.shape[0], dtype=torch.float64) if d is None else d.double()
    cross = alpha * cross.double() + (1 - alpha) * gram.double()
    target = d[:, None] * whitener.inverse_t(w64 @ cross)  # D W C L'^-T
    up, down = factors_from(target, decompose(target, rank), rank)
    return up / d[:, None], whitener.unwhiten(down)


@dataclass
class Correction:
    """What `correct_blocks` did: the layers refit, and why the others were not."""

    tokens: int = 0  # calibration tokens (padding left out)
    refit: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it kept its factors

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "refit": self.refit, "skipped": self.skipped}


@torch.no_grad()
def correct_blocks(
    model: nn.Module,
    originals: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    sensitivity: Mapping[str, torch.Tensor] | None = None,
    damping: float = DEFAULT_DAMPING,
    alpha: float = ALPHA,
    tokens_per_feature: float = TOKENS_PER_FEATURE,
    check: bool = True,
    progress: ProgressFn | None = None,
) -> Correction:
    """In place: refit the `FactorizedLinear` layers of `model` that replaced `originals`
    (name -> the original dense module), block by block in forward order (module docstring).

    `sensitivity`: per-channel output sensitivity (`methods.sensitivity`), turned into the
    output weights D as for the output-aware factors (None: D = I). `check`: keep a refit only
    if, fitted on the even batches, it lowers the error on the odd ones (False: refit every
    layer with enough tokens on all batches)."""
    stack_name, stack = find_blocks(model)
    batches = list(batches)
    fit = _Fit(sensitivity, damping, alpha, check)
    factorized = {
        n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear) and n in originals
    }
    done = Correction()
    outside = {n: originals[n] for n in factorized if not n.startswith(stack_name + ".")}
    done.skipped.update(dict.fromkeys(outside, "outside the block stack"))
    was = model.training
    model.eval()
    try:
        with swapped(model, outside):
            old, extras = first_inputs(model, stack, batches, Activations())
        new, new_extras = (
            first_inputs(model, stack, batches, Activations()) if outside else (old, extras)
        )
        masks = [real_mask(b) for b in batches]
        sizes = {n: m.in_features for n, m in factorized.items()}
        if not _eligible(done, old, masks, sizes, tokens_per_feature, check):
            return done  # nothing to refit: no forward pass
        for index, module in enumerate(stack):
            name = f"{stack_name}.{index}"
            inside = {n: m for n, m in factorized.items() if n.startswith(name + ".")}
            dense = {n: originals[n] for n in inside}
            before = Block(index, name, module, old, extras, masks)
            after = Block(index, name, module, new, new_extras, masks)
            old, replays = _refit_block(model, before, after, inside, dense, done, fit)
            if len(done.refit) + len(done.skipped) == len(factorized):
                if progress:
                    progress("correct", len(stack), len(stack))
                break  # nothing left to refit: the later blocks need no inputs
            new = replays.outputs(Activations())
            replays.discard()
            if progress:
                progress("correct", index + 1, len(stack))
    finally:
        model.train(was)
    return done


@dataclass(frozen=True)
class _Fit:
    """How each layer is refit (`correct_blocks`' arguments)."""

    sensitivity: Mapping[str, torch.Tensor] | None
    damping: float
    alpha: float
    check: bool


@torch.no_grad()
def correct_streamed(
    model: nn.Module,
    targets: Iterable[str],
    batches: Iterable[Mapping[str, torch.Tensor]],
    load: LoadFn,
    factorize: Callable[[str, nn.Module], FactorizedLinear],
    done_with: Callable[[str, FactorizedLinear], None],
    damping: float = DEFAULT_DAMPING,
    alpha: float = ALPHA,
    tokens_per_feature: float = TOKENS_PER_FEATURE,
    check: bool = True,
    progress: ProgressFn | None = None,
    spill_dir: str | Path | None = None,
    spill_over: int = 0,
    sensitivity: Mapping[str, torch.Tensor] | None = None,
) -> Correction:
    """`correct_blocks` on a model whose tree is on the meta device, one block in memory at a
    time: `stream_blocks` loads each block (`load`) and carries the original model's hidden
    states; the compressed model's are carried here beside them. In each block,
    `factorize(name, dense)` gives each of the `targets` there its one-shot layer; once the
    block is refit, `done_with(name, layer)` gets each one, and the dense layers stay in the
    tree. Every target must sit inside the block stack; `sensitivity` weighs the outputs as in
    `correct_blocks` (None: D = I). When
    no layer has enough calibration tokens, returns after loading the first block only, and
    `done_with` is never called. Loaded weights are left for the caller to release. Both
    streams of activations go to disk under `spill_dir` past `spill_over` bytes each, as
    `stream_blocks` puts them."""
    stack_name, _ = find_blocks(model)
    sizes = {n: dense_weight_of(model.get_submodule(n)).shape[1] for n in targets}
    outside = [n for n in sizes if not n.startswith(stack_name + ".")]
    if outside:
        raise ValueError(f"{outside[0]} is outside the block stack")
    done = Correction()
    fit = _Fit(sensitivity, damping, alpha, check)

    def counted(stage: str, i: int, n: int) -> None:
        progress("correct", i, n)

    new = None
    blocks = stream_blocks(
        model, batches, load, spill_dir, counted if progress else None, spill_over
    )
    for block in blocks:
        if new is None:  # no compressed layer before the stack: both streams start equal
            if not _eligible(done, block.hidden, block.masks, sizes, tokens_per_feature, check):
                break
            new = block.hidden
        dense = {n: model.get_submodule(n) for n in sizes if n.startswith(block.name + ".")}
        inside = {n: factorize(n, m) for n, m in dense.items()}
        after = Block(block.index, block.name, block.module, new, block.extras, block.masks)
        previous = new
        with swapped(model, inside):
            outputs, replays = _refit_block(model, block, after, inside, dense, done, fit)
            outputs.discard()
            new = replays.outputs(block.hidden.sibling(f"{block.index}-compressed"))
            replays.discard()
        if previous is not block.hidden:  # (the first block's: still the original's)
            previous.discard()
        for n, layer in inside.items():
            done_with(n, layer)
        # back in stream_blocks, the block runs with its dense layers: the original's outputs
    return done


def _eligible(done: Correction, first: Activations, masks, sizes, per_feature, check) -> bool:
    """Count the calibration tokens into `done` and mark the layers that cannot be refit
    (too few tokens per input feature; one batch and a held-out check); False when none can."""
    done.tokens = sum(_tokens(first.get(i), masks[i]) for i in range(len(masks)))
    for name, features in sizes.items():
        need = per_feature * features
        if name not in done.skipped and done.tokens < need:
            done.skipped[name] = f"{done.tokens} calibration tokens, {need:.0f} needed"
    if check and len(masks) < 2:
        done.skipped.update(dict.fromkeys(sizes, "one calibration batch: no held-out batch"))
    return len(done.skipped) < len(sizes)


def _refit_block(model, before: Block, after: Block, inside, dense, done, fit: _Fit):
    """Refit the factorized layers `inside` one block (dense: their original modules) in
    place, in forward order, from their inputs in the original (`before`, with `dense` swapped
    in) and in the compressed model (`after`, as the tree is). Returns the original block's
    outputs (what it hands the next block), from the same run that caught its inputs, and the
    `Replays` of the compressed block (its outputs from them: `Replays.outputs`)."""
    from compressor.methods.output_aware import channel_weights

    with swapped(model, dense):
        stages, originals, outputs = _original_run(model, before, list(inside))
    replays = Replays(model, after)
    for group in stages:
        leader = group[0]
        stage = [n for n in group if n not in done.skipped]
        if not stage:
            replays.settled(group)
            continue
        fitted, held = _statistics(replays, originals[leader], stage[0])
        both = (fitted[0] + held[0], fitted[1] + held[1])
        for layer_name in stage:
            layer = inside[layer_name]
            sens = fit.sensitivity
            d = channel_weights(sens[layer_name]) if sens else None
            w = dense_weight_of(dense[layer_name])
            if fit.check and not _wins_held_out(w, layer, fitted, held, d, fit.damping, fit.alpha):
                done.skipped[layer_name] = HELD_OUT
                continue
            up, down = corrected_factors(w, *both, layer.rank, d, fit.damping, fit.alpha)
            layer.load_factors(up.to(layer.up.weight), down.to(layer.up.weight))
            done.refit.append(layer_name)
        originals[leader].discard()
        replays.settled(group)
    return outputs, replays


def _original_run(model: nn.Module, block: Block, names: list[str]):
    """One run of `block` (as the tree is: the original layers) over every batch, catching
    what it hands the next block and the inputs of `names`: (the names in forward order,
    grouped where consecutive layers read the same tensor; per group, the input its layers
    share (real tokens x features, float32) per batch; the block's outputs per batch)."""
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def pre(module, args):
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))

        return pre

    outputs = block.hidden.sibling(f"{block.index}-original")
    inputs: dict[str, Activations] = {}
    stages: list[list[str]] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for i in range(len(block)):
            seen.clear()
            outputs.put(i, block.run(i))
            if i == 0:
                stages = _grouped(seen, names)
            shared = dict(seen)
            for stage in stages:
                if stage[0] not in inputs:
                    inputs[stage[0]] = block.hidden.sibling(f"{block.index}-{stage[0]}")
                x = real_rows(shared[stage[0]], block.masks[i])
                inputs[stage[0]].put(i, x.reshape(-1, x.shape[-1]).float())
    finally:
        for h in handles:
            h.remove()
    return stages, inputs, outputs


def _grouped(seen: list[tuple[str, torch.Tensor]], names: list[str]) -> list[list[str]]:
    """The layers `seen` (name, input) in forward order, grouped where consecutive layers read
    the same tensor; every one of `names` must be among them."""
    missing = [n for n in names if all(n != s for s, _ in seen)]
    if missing:
        raise ValueError(f"{missing[0]}: never reached by the forward pass of its block")
    stages: list[list[str]] = []
    for i, (name, tensor) in enumerate(seen):
        if i and tensor is seen[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def _statistics(replays: Replays, originals: Activations, name: str):
    """(C, G') = (X^T X', X'^T X') of layer `name`, over the even batches (to fit on) and
    over the odd ones (to check the fit on); X per batch in `originals`, X' from the
    compressed block's runs (`replays`)."""
    halves = []
    for i in range(len(replays.block)):
        x = originals.get(i)
        x_new = replays.input_of(name, i)
        if not halves:
            square = (x.shape[1], x.shape[1])
            halves = [
                [x.new_zeros(square, dtype=torch.float64) for _ in range(2)] for _ in range(2)
            ]
        cross, gram = halves[i % 2]
        cross += x.T @ x_new  # float32 products (as `LayerStats.add`), float64 sums
        gram += x_new.T @ x_new
    return halves[0], halves[1]


def _wins_held_out(w, layer: FactorizedLinear, fit, held, d, damping, alpha) -> bool:
    """Whether the refit on the `fit` statistics beats the layer's one-shot factors on the
    `held` ones."""
    up, down = corrected_factors(w, *fit, layer.rank, d, damping, alpha)
    return _held_out_error(w, up @ down, *held, d) < _held_out_error(
        w, layer.dense_weight(), *held, d
    )


def _held_out_error(w, candidate, cross, gram, d) -> float:
    """||D (M X'^T - W X^T)||_F^2 of the weight M = `candidate` on the checking batches, less
    the constant ||D W X^T||^2 (the same for every candidate): from C and G' alone."""
    d = torch.ones(w.shape[0], dtype=torch.float64) if d is None else d.double()
    dm = d[:, None] * candidate.double()
    dw = d[:, None] * w.double()
    return float((dm @ gram * dm).sum() - 2 * (dm @ cross.T * dw).sum())


def _tokens(hidden: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The real tokens of one batch entering the blocks (as `Replays.input_of` counts its rows)."""
    rows = real_rows(hidden, mask)
    return rows.numel() // rows.shape[-1]
