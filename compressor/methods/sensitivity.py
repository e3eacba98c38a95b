"""Output sensitivity: how much an error at each layer's output moves the model's output.

A short backward pass with random probes (Hutchinson): for the model's main output f
(`last_hidden_state`, else `logits`) and a Gaussian probe r on its real tokens, the gradient
of <r, f> with respect to a layer's output y is J^T r, and E_r ||J^T r||^2 = ||J||_F^2. So the
mean squared gradient per output element is the factor by which a small isotropic error at y
grows on its way to the model's output: the Fisher-style weight that makes the layers'
whitened truncation errors comparable (`core.allocate.output_gains`).

Cost: one forward and one backward pass per probed batch and probe; memory of one training
step. Only the leading batches holding `SENSITIVITY_TOKENS` real tokens are probed
(`probed_batches`); the rest run forward only, for the Grams counted on the same passes.
A vocabulary-wide linear head is stood in for by a square one (`head_probe`): the same
sensitivity in expectation without the logits, whose product, gradient and probes were a
third of the pass on SmolLM2 (49,152 logits per token against a width of 576).

The pieces are shared with the block-by-block measurement of a model on the meta device
(`pipelines.sensitivity`, the same numbers bit for bit): `ChannelSquares` (the hooks on the
targets' outputs and the per-channel sums), `probe` (the seeded Gaussian probes, zero on
padding), `with_grads` (eval mode, every parameter requiring grad, as one backward pass) and
`head_probe` (the head's stand-in).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from compressor.core.progress import ProgressFn
from compressor.core.surgery import module_hooks, swapped
from compressor.core.tasks import model_inputs
from compressor.methods.blocks import real_mask
from compressor.methods.calibration import GramCollector

__all__ = [
    "SENSITIVITY_TOKENS",
    "ChannelSquares",
    "head_probe",
    "main_output",
    "output_sensitivity",
    "probe",
    "probed_batches",
    "with_grads",
]

SENSITIVITY_TOKENS = 4096
"""The real tokens the output sensitivity is probed on (the leading calibration batches that
hold them): a per-channel mean of squared gradients settles long before the Grams do. On
SmolLM2-135M with 32 x 512 calibration tokens, probing half the batches instead of all of them
moved the held-out perplexity of `--data --keep 0.8` from 31.46 to 31.52 (a quarter: 31.65)
and saved a fifth of the run (docs/benchmarks.md)."""


def probed_batches(
    batches: Sequence[Mapping[str, torch.Tensor]], tokens: int | None = SENSITIVITY_TOKENS
) -> int:
    """How many leading `batches` the sensitivity probes: the fewest whose real tokens reach
    `tokens` (all of them when None or when they hold fewer). A batch's real tokens are its
    attention mask's, else its `input_ids`' count, else its samples (pixels have no tokens)."""
    if tokens is None:
        return len(batches)
    seen = 0
    for i, batch in enumerate(batches):
        seen += _tokens(batch)
        if seen >= tokens:
            return i + 1
    return len(batches)


def _tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = real_mask(batch)
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids")
    if torch.is_tensor(ids):
        return ids.numel()
    first = next((v for v in batch.values() if torch.is_tensor(v) and v.ndim), None)
    return int(first.shape[0]) if first is not None else 0


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
    grams: GramCollector | None = None,
    tokens: int | None = SENSITIVITY_TOKENS,
) -> dict[str, torch.Tensor]:
    """Per target and output channel: the mean over real tokens and probes of (d<r, f>/dy_j)^2
    (a vector of the layer's output width; its mean is the layer's scalar sensitivity), over
    the leading batches holding `tokens` real tokens (`probed_batches`; None: all).
    `grams`: also counts the targets' inputs on the same forward passes (the first probe's),
    as `collect_grams` does, over every batch (those past the probed ones run forward only),
    so the calibration statistics cost no pass of their own."""
    batches = list(batches)
    probed = probed_batches(batches, tokens)
    if grams is None:
        batches = batches[:probed]
    squares = ChannelSquares(targets)
    generator = torch.Generator().manual_seed(seed)
    counting = grams.hooked() if grams is not None else nullcontext()
    with squares.hooked(), with_grads(model), counting, head_probe(model):
        for i, batch in enumerate(batches):
            inputs = model_inputs(batch, model)
            squares.mask = real_mask(batch)
            if i >= probed:  # past the probed batches (kept for the Grams): forward only
                grams.batch(squares.mask)
                with torch.no_grad():
                    model(**inputs)
            else:
                for p in range(probes):
                    if grams is not None:
                        grams.batch(squares.mask if p == 0 else None, counting=p == 0)
                    with torch.enable_grad():
                        out = main_output(model(**inputs))
                        (out * probe(out, generator, squares.mask)).sum().backward()
            if progress:
                progress("sensitivity", i + 1, len(batches))
    return squares.result()


def probe(out: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None) -> torch.Tensor:
    """The next Gaussian probe r for the main output `out` (drawn from `generator`), zero on
    padding: the gradient of <r, out> is what `output_sensitivity` measures."""
    r = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    if mask is not None and out.ndim == 3:
        r = r * mask.unsqueeze(-1)
    return r


@contextmanager
def head_probe(model: nn.Module) -> Iterator[None]:
    """Meanwhile a model whose main output is its linear head's (logits = W h, W vocabulary x
    width, wider than tall) has the head stood in for by the square C^T, C C^T = W^T W: a
    Gaussian probe's gradient at the head's input, C r, then has the covariance W^T W of the
    logits' W^T r, so every layer's sensitivity is the same in expectation, and the logits,
    their gradient and their probes are never formed. Not for a head whose logits go through
    a nonlinearity (Gemma 2's soft-capping); otherwise nothing changes."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    capped = getattr(config, "final_logit_softcapping", None) is not None
    if not isinstance(head, nn.Linear) or head.out_features <= head.in_features or capped:
        yield
        return
    name = next(n for n, m in model.named_modules() if m is head)
    w = head.weight.detach().double()
    gram = w.T @ w
    gram.diagonal().add_(1e-12 * float(gram.diagonal().mean()))  # a rank-deficient head
    stand_in = nn.Linear(head.in_features, head.in_features, bias=False)
    stand_in.weight.data = torch.linalg.cholesky(gram).T.to(head.weight.dtype).contiguous()
    stand_in.requires_grad_(False)
    with swapped(model, {name: stand_in}):
        yield


class ChannelSquares:
    """Per target: the sum of its output gradients' squares per channel over real tokens (the
    gradient caught by a hook on the output of each forward pass while `hooked`), and their
    count. `mask`: the current batch's real tokens (None: all)."""

    def __init__(self, targets: Mapping[str, nn.Module]) -> None:
        self.targets = targets
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(targets, 0.0)
        self.counts = dict.fromkeys(targets, 0)
        self.mask: torch.Tensor | None = None

    def hooked(self) -> AbstractContextManager[None]:
        """Catch the output gradients of the targets' forward passes meanwhile."""
        return module_hooks(self.targets, self._hook)

    def _hook(self, name: str):
        def forward_hook(module, args, output):
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g, n=name: self._accumulate(n, g))

        return forward_hook

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        mask = self.mask
        if mask is not None and grad.ndim == 3 and tuple(grad.shape[:2]) == tuple(mask.shape):
            grad = grad[mask]
        g = grad.detach().double().reshape(-1, grad.shape[-1])
        self.sums[name] = self.sums[name] + g.square().sum(0)
        self.counts[name] += g.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """The mean squared gradient per channel, float64, per target."""
        return {
            n: torch.as_tensor(self.sums[n], dtype=torch.float64) / max(self.counts[n], 1)
            for n in self.targets
        }


@contextmanager
def with_grads(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode with gradients flowing through its activations meanwhile (as one
    backward pass of the sensitivity sees it); then its flags and mode back, its gradients
    dropped. Where the model has embeddings their outputs require grad and no parameter does,
    so the backward pass computes the activations' gradients only (no weight gradients: half
    its cost); otherwise every parameter requires grad."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    embeddings = _embeddings(model)
    model.eval().requires_grad_(not embeddings)
    handles = [e.register_forward_hook(_requiring_grad) for e in embeddings]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters(remove_duplicate=False):  # (some may be new)
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """The modules that turn a model's inputs into vectors: its `nn.Embedding`s (an encoder-
    decoder's encoder and decoder may each hold their own) and its input embeddings (a
    transformers model's, e.g. ViT's patch embeddings). None: a plain module."""
    found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    getter = getattr(model, "get_input_embeddings", None)
    try:
        given = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        given = None
    if isinstance(given, nn.Module) and all(given is not m for m in found):
        found.append(given)
    return found


def _requiring_grad(module: nn.Module, args, output):
    """A forward hook: the module's output, a leaf of the graph that requires grad."""
    if torch.is_tensor(output) and torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output
