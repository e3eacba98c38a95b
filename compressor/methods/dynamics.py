"""Ranks from learning dynamics (docs/method.md section 5): the directions each layer moves in.

Two sources of an update dW per targeted layer:
  - a recorded trajectory: `reference_updates(targets, reference)` gives W - W_ref, with W_ref
    the checkpoint the model was trained or fine-tuned from;
  - a warm-up run: `warmup_updates(model, targets, batches, steps)` trains a copy of the dense
    model for a few steps with the model's own objective (causal LM, masked LM, or the loss
    it computes from the data's labels) and gives W_K - W_0.
With AdamW the update is the optimiser's path; with `optimizer="sgd"` it is exactly -lr times
the summed gradients. `update_rank` reads a rank from an update's spectrum, and
`joint_subspace` finds the input directions that carry both W and dW (the seed's 2r idea).
Peak memory of a warm-up: the model, its copy, its gradients and AdamW's two moments
(about 5x the model's parameters in float32).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from compressor.core.compress import FactorFn
from compressor.core.layers import dense_weight_of
from compressor.core.linalg import energy_rank, singular_values
from compressor.core.plan import MethodInputs, Weights
from compressor.core.progress import ProgressFn
from compressor.core.tasks import TaskSpec, logits_of, model_inputs, task_spec
from compressor.errors import DlncError
from compressor.methods.registry import RankMethod, register

__all__ = [
    "Dynamics",
    "LossFn",
    "joint_subspace",
    "reference_updates",
    "update_rank",
    "warmup_loss",
    "warmup_updates",
]

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""loss_fn(model, batch) -> scalar loss: one step's objective in a warm-up run."""


def reference_updates(
    targets: Mapping[str, nn.Module], reference: nn.Module
) -> dict[str, torch.Tensor]:
    """W - W_ref for every target, W_ref the module of the same name in `reference`."""
    modules = dict(reference.named_modules())
    updates = {}
    for name, module in targets.items():
        ref = modules.get(name)
        if ref is None or not hasattr(ref, "weight"):
            raise DlncError(
                f"{name}: not in the reference checkpoint; is it the same architecture?"
            )
        w, w_ref = dense_weight_of(module), dense_weight_of(ref)
        if w.shape != w_ref.shape:
            raise DlncError(
                f"{name}: shape {tuple(w.shape)} but {tuple(w_ref.shape)} in the reference"
            )
        updates[name] = (w.detach().float() - w_ref.detach().float()).contiguous()
    return updates


def warmup_loss(model: nn.Module, has_labels: bool, mask_token_id: int | None = None) -> LossFn:
    """The model's own objective: its loss on the data's labels when there are labels, else
    its task loss when it is a causal or masked LM (`compressor.core.tasks.TaskSpec.loss`);
    a model with neither (a bare encoder) gets `encoder_warmup.denoising_loss`.
    """
    if has_labels:
        return _own_loss
    spec = task_spec(model, mask_token_id)
    if spec.is_lm:
        if spec.unscorable(has_labels=False) is not None:
            raise DlncError(
                f"{spec.model_name}: a masked-LM warm-up needs the tokenizer's [MASK] token"
            )
        return _task_loss(spec)
    from compressor.methods.encoder_warmup import denoising_loss

    return denoising_loss(model, spec.mask_token_id)  # a bare encoder: denoising self-distillation


def _task_loss(spec: TaskSpec) -> LossFn:
    """The LM task loss on each batch (a masked LM's tokens masked by a seeded draw)."""
    generator = torch.Generator().manual_seed(0)

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch = spec.prepare(batch, generator)
        return spec.loss(logits_of(model(**spec.inputs(batch))), batch)

    return loss_fn


def _own_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise DlncError(f"{type(model).__name__} returned no loss for the data's labels")
    return loss


def warmup_updates(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    steps: int,
    loss_fn: LossFn | None = None,
    *,
    lr: float = 1e-4,
    optimizer: str = "adamw",
    mask_token_id: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, torch.Tensor]:
    """W_K - W_0 of every target after `steps` steps of training a copy of the dense model.

    `loss_fn` defaults to `warmup_loss` (the model's own objective). `model` is not changed.
    """
    if steps < 1:
        raise DlncError(f"`warmup_steps` must be >= 1, got {steps}")
    if not batches:
        raise DlncError("a warm-up run needs `data`")
    has_labels = "labels" in batches[0]
    loss_fn = loss_fn or warmup_loss(model, has_labels, mask_token_id)
    names = dict(model.named_modules())
    paths = {name: _path_of(names, module) for name, module in targets.items()}
    work = copy.deepcopy(model).train()
    opt = _optimizer(work, optimizer, lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            batch = batches[step % len(batches)]
            loss = loss_fn(work, batch if has_labels else model_inputs(batch, work))
            if not torch.isfinite(loss):
                raise DlncError(
                    f"the warm-up loss is {float(loss)} at step {step}; lower `warmup_lr`"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(work.parameters(), 1.0)
            opt.step()
            if progress:
                progress("warm-up", step + 1, steps)
    moved = dict(work.named_modules())
    return {
        name: (dense_weight_of(moved[paths[name]]).detach().float()
               - dense_weight_of(module).detach().float()).contiguous()
        for name, module in targets.items()
    }  # fmt: skip


def _path_of(names: Mapping[str, nn.Module], module: nn.Module) -> str:
    return next(n for n, m in names.items() if m is module)


def _optimizer(model: nn.Module, kind: str, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise DlncError(f"`optimizer` must be adamw or sgd, got {kind!r}")


def update_rank(
    update_spectrum: torch.Tensor,
    weight_spectrum: torch.Tensor,
    tau: float = 0.9,
    floor: float = 1e-4,
) -> int:
    """The rank an update needs: its energy rank at `tau`, counting only singular values
    above `floor` times the weight's largest (a layer that did not move has rank 0)."""
    s = update_spectrum.double()
    top = float(weight_spectrum[0]) if weight_spectrum.numel() else 0.0
    return energy_rank(s[s > floor * top], tau) if s.numel() else 0


def joint_subspace(
    w: torch.Tensor, update: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input directions carrying both the weight and its update: the right singular vectors
    (and singular values) of [W / ||W||_F ; dW / ||dW||_F], stacked by rows, in float64.

    Its top-k right singular vectors Q give the rank-k weight W Q Q^T, which keeps W exactly
    on the directions the update moves in (the seed's 2r). Without an update (or a zero one)
    this is the plain SVD of W, scaled.
    """
    w64 = w.detach().double()
    parts = [w64 / max(float(w64.norm()), 1e-30)]
    if update is not None and float(update.norm()) > 0:
        u64 = update.detach().double()
        parts.append(u64 / float(u64.norm()))
    _, s, vh = torch.linalg.svd(torch.cat(parts), full_matrices=False)
    return s, vh


def subspace_factor_fn(weights: Mapping[str, torch.Tensor], joint: Mapping) -> FactorFn:
    """W Q Q^T with Q the top-k joint input directions, split into balanced factors."""

    def factor(name: str, module: nn.Module, rank: int):
        w = weights[name].detach().double()
        q = joint[name][1][:rank].T  # in x k, orthonormal columns
        u, s, vh = torch.linalg.svd(w @ q, full_matrices=False)
        root = s.sqrt()
        up, down = u * root, root[:, None] * (vh @ q.T)
        rel = float((w - up @ down).norm()) / max(float(w.norm()), 1e-30)
        return up, down, rel

    return factor


class Dynamics(RankMethod):
    """Learning dynamics (docs/method.md 5): ranks from the spectra of [W; dW] (weight and update,
    each normalised), factors that keep W on the input directions the update moves in."""

    name = "dynamics"
    column = "dynamics"
    needs = frozenset({"updates"})
    priority = 2
    requirement = "`method` dynamics needs `reference` CKPT, or `warmup_steps` K with `data`"
    # its joint spectra keep the relative rule: on MiniLM at keep 0.5 the output-aware gains
    # gave embedding cosine 0.376 against 0.438 (docs/data-aware.md)
    output_aware_ranks = False

    def spectra(
        self, weights: Weights, inputs: MethodInputs, progress: ProgressFn | None
    ) -> dict[str, torch.Tensor]:
        return {n: s for n, (s, _) in self._joint(weights, inputs).items()}

    def factor_fn(self, weights: Weights, inputs: MethodInputs, spectra: dict) -> FactorFn:
        return subspace_factor_fn(weights.tensors, self._joint(weights, inputs))

    def reading(
        self, name: str, spectrum: torch.Tensor, weights: Weights, inputs: MethodInputs, tau: float
    ) -> int:
        """The update's own rank (`update_rank`), not the joint spectrum's."""
        return update_rank(singular_values(inputs.updates[name]), weights.spectrum(name), tau)

    @staticmethod
    def _joint(weights: Weights, inputs: MethodInputs) -> dict:
        def make() -> dict:
            return {n: joint_subspace(w, inputs.updates[n]) for n, w in weights.tensors.items()}

        return inputs.once("joint_subspaces", make)


register(Dynamics())
