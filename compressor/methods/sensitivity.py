"""Output sensitivity: how much an error at each layer's output moves the model's output.

A short backward pass with random probes (Hutchinson): for the model's main output f
(`last_hidden_state`, else `logits`) and a Gaussian probe r on its real tokens, the gradient
of <r, f> with respect to a layer's output y is J^T r, and E_r ||J^T r||^2 = ||J||_F^2. So the
mean squared gradient per output element is the factor by which a small isotropic error at y
grows on its way to the model's output: the Fisher-style weight that makes the layers'
whitened truncation errors comparable (`core.allocate.output_gains`).

Cost: one forward and one backward pass per batch and probe; memory of one training step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from compressor.core.progress import ProgressFn
from compressor.core.tasks import model_inputs

__all__ = ["main_output", "output_sensitivity"]


def main_output(out) -> torch.Tensor:
    """The tensor a model is judged by: its last hidden state, else its logits, else the
    first tensor it returns."""
    for key in ("last_hidden_state", "logits"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if torch.is_tensor(value):
            return value
    if torch.is_tensor(out):
        return out
    values = out.values() if isinstance(out, Mapping) else out
    return next(v for v in values if torch.is_tensor(v))


def output_sensitivity(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    probes: int = 1,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """Per target and output channel: the mean over real tokens and probes of (d<r, f>/dy_j)^2
    (a vector of the layer's output width; its mean is the layer's scalar sensitivity)."""
    batches = list(batches)
    sums: dict[str, torch.Tensor | float] = dict.fromkeys(targets, 0.0)
    counts = dict.fromkeys(targets, 0)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def forward_hook(module, args, output):
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g, n=name: _accumulate(n, g))

        return forward_hook

    def _accumulate(name: str, grad: torch.Tensor) -> None:
        mask = state["mask"]
        if mask is not None and grad.ndim == 3 and tuple(grad.shape[:2]) == tuple(mask.shape):
            grad = grad[mask]
        g = grad.detach().double().reshape(-1, grad.shape[-1])
        sums[name] = sums[name] + g.square().sum(0)
        counts[name] += g.shape[0]

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    try:
        for i, batch in enumerate(batches):
            inputs = model_inputs(batch, model)
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            for _ in range(probes):
                with torch.enable_grad():
                    out = main_output(model(**inputs))
                    r = torch.randn(out.shape, generator=generator, dtype=out.dtype)
                    if state["mask"] is not None and out.ndim == 3:
                        r = r * state["mask"].unsqueeze(-1)
                    (out * r).sum().backward()
            if progress:
                progress("sensitivity", i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: torch.as_tensor(sums[n], dtype=torch.float64) / max(counts[n], 1) for n in targets}
