"""What a model does with a batch: its task (from its class), the inputs its forward pass takes,
its real tokens, and the label-making transforms of language-model objectives.

One copy of each, shared by calibration, warm-up runs, fine-tuning and evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compressor.errors import DlncError

__all__ = [
    "IGNORE_INDEX",
    "NOT_INPUTS",
    "TASKS",
    "mask_tokens",
    "model_inputs",
    "shift_right",
    "task_of",
    "token_mask",
    "with_lm_labels",
]

TASKS = ("causal_lm", "masked_lm", "classification", "seq2seq_lm")
IGNORE_INDEX = -100  # the label value transformers' losses skip
NOT_INPUTS = ("labels", "mlm_labels", "special_tokens_mask")  # batch keys the model is not given
_TASK_SUFFIXES = {
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "masked_lm": ("ForMaskedLM",),
    "classification": (
        "ForSequenceClassification",
        "ForImageClassification",
        "ForAudioClassification",
    ),
}


def task_of(model: nn.Module) -> str | None:
    """The model's task from its class (`GPT2LMHeadModel` -> causal_lm) or a `dlnc_task`
    attribute (a plain torch module returning logits), None for a bare encoder."""
    model = getattr(model, "module", model)  # a DDP wrapper
    declared = getattr(model, "dlnc_task", None)  # a plain torch module may declare its task
    if declared in TASKS:
        return declared
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration") and _is_encoder_decoder(model):
        return "seq2seq_lm"
    for task, suffixes in _TASK_SUFFIXES.items():
        if name.endswith(suffixes):
            return task
    return None


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_inputs(
    batch: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The keyword arguments for `model(**inputs)`: the batch without labels and bookkeeping.

    An encoder-decoder (T5) given text alone gets the text as its decoder input too (shifted
    right, teacher forcing), so student and teacher are compared token by token."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    if model is not None and "input_ids" in inputs and "decoder_input_ids" not in inputs:
        inner = getattr(model, "module", model)
        if task_of(inner) == "seq2seq_lm":
            inputs["decoder_input_ids"] = shift_right(inputs["input_ids"], inner.config)
    return inputs


def shift_right(ids: torch.Tensor, config) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then `ids` less its last token.
    A config without `decoder_start_token_id` starts with the pad token, as T5 does."""
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None)
    if start is None:
        raise DlncError(
            "this encoder-decoder's config has neither `decoder_start_token_id` nor "
            "`pad_token_id`; add one to its config.json"
        )
    shifted = ids.new_full(ids.shape, start)
    shifted[..., 1:] = ids[..., :-1]
    return shifted


def token_mask(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The real (non-padding) positions of a [batch, seq, ...] output `like`."""
    mask = batch.get("attention_mask")
    if mask is None or mask.shape != like.shape[:2]:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def mask_tokens(
    batch: Mapping[str, torch.Tensor],
    mask_token_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Masked LM: a copy of the batch with `probability` of the real tokens (not the first and
    last, i.e. [CLS] and [SEP]) replaced by [MASK]; the originals become `mlm_labels`.

    A batch never ends up with nothing to predict: if the draw masks no token, every
    maskable one is masked."""
    ids = batch["input_ids"]
    real = token_mask(batch, ids).clone()
    real[:, 0] = False
    last = real.long().cumsum(1).argmax(1)
    real[torch.arange(len(ids), device=ids.device), last] = False
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = real & (draw < probability)
    if not chosen.any():
        chosen = real
    out = dict(batch)
    out["input_ids"] = ids.masked_fill(chosen, mask_token_id)
    out["mlm_labels"] = ids.masked_fill(~chosen, IGNORE_INDEX)
    return out


def with_lm_labels(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a text batch with causal-LM `labels`: the input ids, padding set to -100."""
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    return {**batch, "labels": labels}
