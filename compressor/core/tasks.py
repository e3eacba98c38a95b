"""What a model does with a batch: its task (from its class), in one `TaskSpec`.

`task_spec(model, mask_token_id)` says, for a model, the inputs its forward pass takes, the
labels of its task, its task loss, whether the data lets that loss be scored, and its [MASK]
token id. Warm-up runs, fine-tuning, evaluation and calibration all read it; nothing else
decides what a task is.

  task            forward inputs                   labels                     loss
  causal_lm       the batch                        the next token (padding    cross-entropy
                                                   -100)
  masked_lm       15% of real tokens -> [MASK]     the masked tokens          cross-entropy
  classification  the batch (a plain module: its   the data's `labels`        cross-entropy;
                  `dlnc_task`)                                                MSE (1 logit)
  seq2seq_lm      + the text shifted right as      none (dlnc's data has no   not scored
                  decoder inputs (teacher forcing) target text)
  None            the batch (a bare encoder)       none                       not scored
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import DlncError

__all__ = [
    "IGNORE_INDEX",
    "LM_TASKS",
    "NOT_INPUTS",
    "TASKS",
    "TaskSpec",
    "is_regression",
    "logits_of",
    "mask_tokens",
    "model_inputs",
    "shift_right",
    "task_of",
    "task_spec",
    "token_mask",
]

TASKS = ("causal_lm", "masked_lm", "classification", "seq2seq_lm")
LM_TASKS = ("causal_lm", "masked_lm")  # scored per token, with a perplexity
IGNORE_INDEX = -100  # the label value transformers' losses skip
NOT_INPUTS = ("labels", "mlm_labels", "special_tokens_mask")  # batch keys the model is not given
MLM_PROBABILITY = 0.15  # share of the real tokens a masked LM predicts
_TASK_SUFFIXES = {
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "masked_lm": ("ForMaskedLM",),
    "classification": (
        "ForSequenceClassification",
        "ForImageClassification",
        "ForAudioClassification",
    ),
}


@dataclass(frozen=True)
class TaskSpec:
    """A model's task and everything that follows from it (see the module docstring)."""

    task: str | None  # one of TASKS, None for a bare encoder
    mask_token_id: int | None = None  # the given [MASK] id, else the model config's
    model_name: str = "the model"  # its class name, for messages
    config: Any = field(default=None, repr=False, compare=False)  # the model's config

    @property
    def is_lm(self) -> bool:
        """Scored per token (a perplexity applies)."""
        return self.task in LM_TASKS

    def unscorable(self, has_labels: bool, has_ids: bool = True) -> str | None:
        """Why the task loss cannot be scored on data with (or without) labels and token ids,
        or None when it can."""
        name = self.model_name
        if self.task is None:
            return f"{name} has no task head (causal LM, masked LM or classification)"
        if self.task == "seq2seq_lm":
            return (
                f"{name}: a seq2seq task loss needs target text, which dlnc's data does not carry"
            )
        if self.task == "classification" and not has_labels:
            return "a classification task loss needs labels in the data (`label_field`)"
        if self.task == "masked_lm" and self.mask_token_id is None:
            return "a masked-LM task loss needs the [MASK] token id: give the tokenizer"
        if self.is_lm and not has_ids:
            return f"a {self.task.replace('_', ' ')} task loss needs token ids in the data"
        return None

    def prepare(
        self,
        batch: Mapping[str, torch.Tensor],
        generator: torch.Generator | None = None,
        probability: float = MLM_PROBABILITY,
    ) -> Mapping[str, torch.Tensor]:
        """The batch the task loss is computed on: a masked LM's tokens masked (its labels in
        `mlm_labels`); any other task's batch unchanged."""
        if self.task != "masked_lm":
            return batch
        return mask_tokens(batch, self.mask_token_id, probability, generator)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments for `model(**inputs)`: the batch without labels and
        bookkeeping; an encoder-decoder given text alone gets it shifted right as its decoder
        input too (teacher forcing), so student and teacher are compared token by token."""
        inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
        teacher_forced = "input_ids" in inputs and "decoder_input_ids" not in inputs
        if self.task == "seq2seq_lm" and teacher_forced:
            inputs["decoder_input_ids"] = shift_right(inputs["input_ids"], self.config)
        return inputs

    def targets(
        self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits that are scored and their labels, aligned: a causal LM's predictions of
        the next real token, a masked LM's masked tokens (`prepare`d), a classifier's labels.
        Skipped positions have the label `IGNORE_INDEX`."""
        if self.task == "causal_lm":
            labels = batch["input_ids"].masked_fill(~token_mask(batch, logits), IGNORE_INDEX)
            return logits[:, :-1], labels[:, 1:]
        if self.task == "masked_lm":
            return logits, batch["mlm_labels"]
        if self.task == "classification":
            return logits, batch["labels"]
        raise DlncError(self.unscorable(has_labels=True))

    def loss(
        self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], reduction: str = "mean"
    ) -> torch.Tensor:
        """The task loss of `logits` (float32): cross-entropy over the `targets`, or MSE for
        a regression head (one logit, float labels); `reduction` as in torch."""
        logits, labels = self.targets(logits, batch)
        logits = logits.float()
        if self.task == "classification":
            if is_regression(logits, labels):
                return F.mse_loss(logits.squeeze(-1), labels.float(), reduction=reduction)
            return F.cross_entropy(logits, labels.long(), reduction=reduction)
        return F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
        )


def is_regression(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """A classification head of one logit trained on float labels."""
    return labels.is_floating_point() and logits.shape[-1] == 1


def task_spec(model: nn.Module, mask_token_id: int | None = None) -> TaskSpec:
    """The `TaskSpec` of `model` (a DDP wrapper is looked through). The [MASK] id is
    `mask_token_id` (the tokenizer's) when given, else the model config's."""
    model = getattr(model, "module", model)
    config = getattr(model, "config", None)
    if mask_token_id is None:
        mask_token_id = getattr(config, "mask_token_id", None)
    return TaskSpec(task_of(model), mask_token_id, type(model).__name__, config)


def task_of(model: nn.Module) -> str | None:
    """The model's task from its class (`GPT2LMHeadModel` -> causal_lm) or a `dlnc_task`
    attribute (a plain torch module returning logits), None for a bare encoder."""
    model = getattr(model, "module", model)  # a DDP wrapper
    declared = getattr(model, "dlnc_task", None)  # a plain torch module may declare its task
    if declared in TASKS:
        return declared
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration"):  # T5; or a decoder that also sees images
        return "seq2seq_lm" if _is_encoder_decoder(model) else "causal_lm"  # (Gemma 3)
    for task, suffixes in _TASK_SUFFIXES.items():
        if name.endswith(suffixes):
            return task
    return None


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def model_inputs(
    batch: Mapping[str, torch.Tensor], model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """`task_spec(model).inputs(batch)`; without a model, the batch less labels and
    bookkeeping."""
    return (task_spec(model) if model is not None else TaskSpec(None)).inputs(batch)


def logits_of(output) -> torch.Tensor:
    """A transformers output's logits; a plain module's output is its logits."""
    return output if isinstance(output, torch.Tensor) else output.logits


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
    probability: float = MLM_PROBABILITY,
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
