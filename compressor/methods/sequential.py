"""Error-correcting calibration: refit each factorized layer on the inputs that the already
compressed layers before it produce, so that errors do not pile up along the depth.

One-shot whitening fits every layer to the *original* model's inputs X. In the compressed
model layer l sees X' instead (the earlier layers are approximations). Here, in forward
order, each factorized layer gets the factors minimising

    || D (W' X'^T - W X^T) ||_F        (D: per-channel output weights, identity by default)

i.e. its output on the inputs it really receives matches the original layer's output on the
original inputs. With C = X^T X' and G' = X'^T X' = L' L'^T (damped), the unconstrained
optimum is W* = W C G'^-1 and the rank-k one is W' = D^-1 trunc_k(D W C L'^-T) L'^+: closed
form, from two Gram-sized statistics per layer (METHOD.md 4 with a cross term).

In memory, with forward hooks on the original and the compressed model side by side; each
forward stops at the layers being refit, so the cost is about one pass per layer input (a
block-by-block loop can later share this maths: `corrected_factors` is pure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear, dense_weight_of
from compressor.core.progress import ProgressFn
from compressor.core.tasks import model_inputs
from compressor.methods.whiten import DEFAULT_DAMPING, Whitener

__all__ = ["correct_sequentially", "corrected_factors"]


def corrected_factors(
    w: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    d: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` (up, down) minimising ||D (W' X'^T - W X^T)||_F, float64.

    `cross` = X^T X' and `gram` = X'^T X' (in x in, the same row count in both), `d` the
    output channel weights (None: all ones)."""
    whitener = Whitener.from_gram(gram, damping)
    w64 = w.detach().double()
    d = torch.ones(w.shape[0], dtype=torch.float64) if d is None else d.double()
    if whitener is None:  # the layer's inputs are all zero: nothing to fit
        raise ValueError("the layer received only zero inputs")
    target = d[:, None] * (w64 @ cross.double() @ whitener.root_pinv.T)  # D W C L'^-T
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root / d[:, None]
    down = (root[:, None] * vh[:rank]) @ whitener.root_pinv
    return up, down


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layers being refit have their input."""


def _stages(original: nn.Module, names: Sequence[str], batch) -> list[list[str]]:
    """`names` in forward order, grouped where consecutive layers read the same tensor."""
    modules = dict(original.named_modules())
    seen: list[tuple[str, int]] = []

    def hook(name):
        def pre(module, args):
            if name not in {n for n, _ in seen}:
                seen.append((name, id(args[0])))

        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            original(**model_inputs(batch, original))
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for i, (name, tensor) in enumerate(seen):
        if i and tensor == seen[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def _inputs(model: nn.Module, names: Sequence[str], batch) -> torch.Tensor:
    """The input (tokens x features, float64, real tokens only) of the first of `names`."""
    module = dict(model.named_modules())[names[0]]
    got: dict[str, torch.Tensor] = {}

    def pre(mod, args):
        got["x"] = args[0]
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(**model_inputs(batch, model))
    except _Stop:
        pass
    finally:
        handle.remove()
    x = got["x"]
    mask = batch.get("attention_mask")
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).double()


@torch.no_grad()
def correct_sequentially(
    original: nn.Module,
    compressed: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    sensitivity: Mapping[str, torch.Tensor] | None = None,
    damping: float = DEFAULT_DAMPING,
    progress: ProgressFn | None = None,
) -> list[str]:
    """In place: refit every `FactorizedLinear` of `compressed` (named as the dense layer it
    replaced in `original`), in forward order. Returns the names refit.

    `sensitivity`: per-channel output sensitivity (`methods.sensitivity`), turned into the
    output weights D as for the output-aware factors (None: D = I)."""
    from compressor.methods.output_aware import channel_weights

    batches = list(batches)
    factorized = {n: m for n, m in compressed.named_modules() if isinstance(m, FactorizedLinear)}
    dense = dict(original.named_modules())
    was = (original.training, compressed.training)
    original.eval()
    compressed.eval()
    stages = _stages(original, list(factorized), batches[0])
    try:
        for i, stage in enumerate(stages):
            width = factorized[stage[0]].in_features
            cross = torch.zeros(width, width, dtype=torch.float64)
            gram = torch.zeros_like(cross)
            for batch in batches:
                x, x_new = _inputs(original, stage, batch), _inputs(compressed, stage, batch)
                cross.addmm_(x.T, x_new)
                gram.addmm_(x_new.T, x_new)
            for name in stage:
                layer = factorized[name]
                d = channel_weights(sensitivity[name]) if sensitivity is not None else None
                w = dense_weight_of(dense[name])
                up, down = corrected_factors(w, cross, gram, layer.rank, d, damping)
                dtype = layer.up.weight.dtype
                layer.load_factors(up.to(dtype), down.to(dtype))
            if progress:
                progress("correct", i + 1, len(stages))
    finally:
        original.train(was[0])
        compressed.train(was[1])
    return [n for stage in stages for n in stage]
