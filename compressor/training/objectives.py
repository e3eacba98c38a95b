"""Fine-tuning losses: distillation from the original model, the model's own task, or a mix.

`build_objective` looks at the student (and teacher) and picks what applies:
  distillation  KL on temperature-softened logits for a model with a head; MSE on the last
                hidden states for an encoder without one (masked to real tokens)
  task          causal LM (next token), masked LM (15% of tokens masked), classification
  mix           mix_weight * distillation + (1 - mix_weight) * task
and raises a one-line `DlncError` when nothing applies (no teacher, no head, no labels).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import DlncError

__all__ = [
    "OBJECTIVES",
    "TASKS",
    "LossParts",
    "Objective",
    "build_objective",
    "hidden_mse",
    "kl_logits",
    "mask_tokens",
    "model_inputs",
    "task_of",
    "token_mask",
]

OBJECTIVES = ("distill", "task", "mix")
TASKS = ("causal_lm", "masked_lm", "classification", "seq2seq_lm")
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


def kl_logits(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2, averaged over real tokens (or rows
    for [batch, classes] logits)."""
    t = temperature
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * t * t
    if mask is None or kl.ndim == 1:
        return kl.mean()
    return kl[mask].mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states over real tokens (mean over features too)."""
    diff = (student.float() - teacher.float())[mask]
    return diff.pow(2).mean()


@dataclass
class LossParts:
    """One batch's loss and what it is made of (`rows`: the batch's samples)."""

    loss: torch.Tensor
    parts: dict[str, float]
    rows: int


@dataclass
class Objective:
    """A resolved objective: which loss terms run, on which outputs."""

    kind: str  # "distill" | "task" | "mix"
    task: str | None  # the student's task (None: a bare encoder)
    distill_on: str | None  # "logits" | "hidden" | None
    temperature: float = 2.0
    mix_weight: float = 0.5  # weight of the distillation term in "mix"
    mask_token_id: int | None = None  # masked LM: the [MASK] token
    mlm_probability: float = 0.15

    def describe(self) -> str:
        distill = {
            "logits": f"KL on logits (T={self.temperature:g})",
            "hidden": "MSE on the last hidden states",
        }.get(self.distill_on or "", "")
        task = (self.task or "").replace("_", " ")
        if self.kind == "distill":
            return f"distillation: {distill}"
        if self.kind == "task":
            return f"task loss: {task}"
        w = self.mix_weight
        return f"mix: {w:g} x distillation ({distill}) + {1 - w:g} x {task}"

    @property
    def uses_teacher(self) -> bool:
        return self.kind in ("distill", "mix")

    @property
    def uses_task(self) -> bool:
        return self.kind in ("task", "mix")

    def __call__(
        self,
        student: nn.Module,
        batch: Mapping[str, torch.Tensor],
        teacher: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> LossParts:
        """Forward the student (with gradients) and the teacher (without) and combine the terms."""
        batch = (
            mask_tokens(batch, self.mask_token_id, self.mlm_probability, generator)
            if (self.uses_task and self.task == "masked_lm")
            else batch
        )
        inputs = model_inputs(batch, student)
        s_out = student(**inputs)
        parts: dict[str, torch.Tensor] = {}
        if self.uses_teacher:
            with torch.no_grad():
                t_out = teacher(**inputs)
            parts["distill"] = self._distill(s_out, t_out, batch)
        if self.uses_task:
            parts["task"] = self._task_loss(s_out, batch)
        loss = self._combine(parts)
        return LossParts(loss, {k: float(v.detach()) for k, v in parts.items()}, _rows(batch))

    def _combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "mix":
            return self.mix_weight * parts["distill"] + (1 - self.mix_weight) * parts["task"]
        return parts["distill" if self.kind == "distill" else "task"]

    def _distill(self, s_out, t_out, batch) -> torch.Tensor:
        if self.distill_on == "logits":
            s_logits, t_logits = logits_of(s_out), logits_of(t_out)
            mask = token_mask(batch, s_logits) if s_logits.ndim == 3 else None
            return kl_logits(s_logits, t_logits, mask, self.temperature)
        hidden = s_out.last_hidden_state
        return hidden_mse(hidden, t_out.last_hidden_state, token_mask(batch, hidden))

    def _task_loss(self, s_out, batch) -> torch.Tensor:
        logits = logits_of(s_out).float()
        if self.task == "causal_lm":
            labels = batch["input_ids"].masked_fill(~token_mask(batch, logits), -100)
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
        if self.task == "masked_lm":
            return F.cross_entropy(
                logits.flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100
            )
        labels = batch["labels"]
        if labels.is_floating_point() and logits.shape[-1] == 1:  # regression
            return F.mse_loss(logits.squeeze(-1), labels.float())
        return F.cross_entropy(logits, labels.long())


def logits_of(output) -> torch.Tensor:
    """A transformers output's logits; a plain module's output is its logits."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def mask_tokens(
    batch: Mapping[str, torch.Tensor],
    mask_token_id: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Masked LM: a copy of the batch with `probability` of the real tokens (not the first and
    last, i.e. [CLS] and [SEP]) replaced by [MASK]; the originals become `mlm_labels`."""
    ids = batch["input_ids"]
    real = token_mask(batch, ids).clone()
    real[:, 0] = False
    last = real.long().cumsum(1).argmax(1)
    real[torch.arange(len(ids), device=ids.device), last] = False
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = real & (draw < probability)
    out = dict(batch)
    out["input_ids"] = ids.masked_fill(chosen, mask_token_id)
    out["mlm_labels"] = ids.masked_fill(~chosen, -100)
    return out


def build_objective(
    kind: str,
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    temperature: float = 2.0,
    mix_weight: float = 0.5,
    mask_token_id: int | None = None,
    has_labels: bool = False,
) -> Objective:
    """The objective `kind` resolved for this student and teacher; a `DlncError` when it cannot
    apply (distillation without a teacher, a task loss without a head or labels)."""
    if kind not in OBJECTIVES:
        raise DlncError(f"`objective` must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
    task = task_of(student)
    distill_on = None
    if kind in ("distill", "mix"):
        if teacher is None:
            raise DlncError(f"objective {kind!r} distils from the original model: give --teacher")
        distill_on = _distill_target(student, teacher)
    if kind in ("task", "mix"):
        _check_task(task, student, mask_token_id, has_labels)
    mask_token_id = mask_token_id if mask_token_id is not None else _config_mask_id(student)
    return Objective(kind, task, distill_on, temperature, mix_weight, mask_token_id)


def _distill_target(student: nn.Module, teacher: nn.Module) -> str:
    """Logits when both models have the same head, hidden states when neither has one."""
    task, teacher_task = task_of(student), task_of(teacher)
    if task == teacher_task:
        return "logits" if task is not None else "hidden"
    names = [type(getattr(m, "module", m)).__name__ for m in (student, teacher)]
    raise DlncError(f"cannot distil {names[0]} from {names[1]}: the teacher needs the same head")


def _check_task(task: str | None, student: nn.Module, mask_token_id, has_labels: bool) -> None:
    name = type(getattr(student, "module", student)).__name__
    if task is None:
        raise DlncError(
            f"{name} has no task head (causal LM, masked LM or classification); "
            "use --objective distill with --teacher"
        )
    if task == "seq2seq_lm":
        raise DlncError(
            f"{name}: a seq2seq task loss needs target text, which dlnc's data does not carry; "
            "use --objective distill with --teacher"
        )
    if task == "classification" and not has_labels:
        raise DlncError("a classification task loss needs labels in the data (--label-field)")
    if task == "masked_lm" and mask_token_id is None and _config_mask_id(student) is None:
        raise DlncError("a masked-LM task loss needs the [MASK] token id: give the tokenizer")


def _config_mask_id(model: nn.Module) -> int | None:
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "mask_token_id", None)
