"""A warm-up objective for models without a head (bare encoders such as `BertModel`).

The student (the copy being warmed up) sees a perturbed input, with a share of its real
tokens replaced by [MASK] (or, without a mask token, only dropout), and is trained to give the
frozen original's hidden states on the clean input: a denoising self-distillation. At step 0
its gradient is not zero (the perturbation makes the outputs differ), and the directions it
moves each layer in are those that carry the output back to the original's: what a recovery
fine-tuning of the compressed model will also need.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.tasks import mask_tokens, model_inputs
from compressor.methods.sensitivity import main_output

__all__ = ["denoising_loss"]


def denoising_loss(model: nn.Module, mask_token_id: int | None = None, probability: float = 0.15):
    """loss_fn(student, batch): MSE of the student's output on a masked batch to the frozen
    original's output on the clean batch, over real tokens."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)

    def loss_fn(student: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(batch)
        with torch.no_grad():
            target = main_output(teacher(**inputs))
        if mask_token_id is not None and "input_ids" in inputs:
            inputs = model_inputs(mask_tokens(inputs, mask_token_id, probability, generator))
        out = main_output(student(**inputs))
        mask = batch.get("attention_mask")
        if mask is None or out.ndim != 3:
            return F.mse_loss(out, target)
        real = mask.bool()
        return F.mse_loss(out[real], target[real])

    return loss_fn
