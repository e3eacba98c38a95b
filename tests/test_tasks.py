"""The task specification: what each model's task is, its inputs, labels and loss (checked
against hand computations), whether data can score it, and the one [MASK] fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny

from compressor.core.tasks import TaskSpec, task_spec
from compressor.errors import DlncError
from compressor.workflows.demo import WideMLP


def _batch(pad: bool = True) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0 if pad else 1]])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    ("family", "task"),
    [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("bert", "masked_lm"),
     ("vit", "classification"), ("t5", "seq2seq_lm"), ("phi3", "causal_lm"),
     ("gemma3", "causal_lm")],  # Gemma 3 with its vision tower: a decoder, not a seq2seq
)  # fmt: skip
def test_the_spec_reads_the_head(family, task):
    spec = task_spec(build_tiny(family))
    assert spec.task == task and spec.model_name == type(build_tiny(family)).__name__


def test_a_plain_module_declares_its_task_and_a_bare_encoder_has_none():
    assert task_spec(WideMLP(width=8)).task == "classification"
    assert task_spec(build_tiny("bert").bert).task is None


def test_causal_lm_labels_and_loss_are_the_next_real_token():
    spec = TaskSpec("causal_lm")
    batch = _batch()
    logits = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(0))
    _, labels = spec.targets(logits, batch)
    assert labels.tolist() == [[6, 7, 8], [10, 11, -100]]  # padding is not predicted
    terms = [F.cross_entropy(logits[r, p], batch["input_ids"][r, p + 1], reduction="sum")
             for r, p in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]]  # fmt: skip
    torch.testing.assert_close(spec.loss(logits, batch), sum(terms) / 5)
    torch.testing.assert_close(spec.loss(logits, batch, reduction="sum"), sum(terms))


def test_classification_and_regression_losses():
    spec = TaskSpec("classification")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    hand = -(torch.log_softmax(logits, -1)[[0, 1], [0, 0]]).mean()
    torch.testing.assert_close(spec.loss(logits, {"labels": labels}), hand)
    scores, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0])
    assert float(spec.loss(scores, {"labels": targets})) == pytest.approx(1.0)  # MSE


def test_masked_lm_predicts_only_masked_tokens():
    spec = task_spec(build_tiny("bert"), mask_token_id=3)
    batch = spec.prepare(_batch(), torch.Generator().manual_seed(0), probability=1.0)
    masked = batch["input_ids"] == 3
    assert masked.any() and "mlm_labels" not in spec.inputs(batch)
    logits = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1))
    original = _batch()["input_ids"]
    hand = F.cross_entropy(logits[masked], original[masked])
    torch.testing.assert_close(spec.loss(logits, batch), hand)


def test_the_mask_id_is_the_given_one_else_the_configs():
    model = build_tiny("bert")
    assert task_spec(model, mask_token_id=7).mask_token_id == 7
    assert task_spec(model).mask_token_id is None  # the tiny config has none
    model.config.mask_token_id = 4
    assert task_spec(model).mask_token_id == 4
    assert task_spec(model, mask_token_id=7).mask_token_id == 7


@pytest.mark.parametrize(
    ("spec", "labels", "ids", "reason"),
    [
        (TaskSpec("causal_lm"), False, True, None),
        (TaskSpec("causal_lm"), False, False, "needs token ids"),
        (TaskSpec("masked_lm"), False, True, "needs the [MASK] token id"),
        (TaskSpec("masked_lm", 3), False, True, None),
        (TaskSpec("classification"), False, True, "needs labels"),
        (TaskSpec("classification"), True, False, None),
        (TaskSpec("seq2seq_lm"), True, True, "needs target text"),
        (TaskSpec(None), True, True, "has no task head"),
    ],
)
def test_what_can_be_scored(spec, labels, ids, reason):
    found = spec.unscorable(labels, ids)
    assert found is None if reason is None else reason in found


@pytest.mark.parametrize("task", [None, "seq2seq_lm"])
def test_a_task_without_labels_has_no_loss(task):
    with pytest.raises(DlncError, match="task"):
        TaskSpec(task).loss(torch.zeros(1, 2, 3), {"input_ids": torch.zeros(1, 2).long()})


def test_seq2seq_inputs_are_teacher_forced():
    spec = task_spec(build_tiny("t5"))
    inputs = spec.inputs({**_batch(), "labels": torch.zeros(2)})
    assert "labels" not in inputs
    assert inputs["decoder_input_ids"].tolist() == [[0, 5, 6, 7], [0, 9, 10, 11]]


def test_seq2seq_decoder_inputs_fall_back_to_the_pad_token():
    from compressor.core.tasks import model_inputs

    model = build_tiny("t5", decoder_start_token_id=None)
    ids = torch.tensor([[5, 6, 7]])
    inputs = model_inputs({"input_ids": ids}, model)
    assert inputs["decoder_input_ids"].tolist() == [[0, 5, 6]]


def test_seq2seq_without_start_or_pad_token_is_a_one_line_error():
    from compressor.core.tasks import model_inputs

    model = build_tiny("t5", decoder_start_token_id=None, pad_token_id=None)
    with pytest.raises(DlncError, match="decoder_start_token_id"):
        model_inputs({"input_ids": torch.tensor([[5, 6, 7]])}, model)


def test_t5_without_a_start_token_fine_tunes():
    """Distillation of a T5 whose config has no decoder_start_token_id (ValueError from
    T5's _shift_right before): the decoder reads the text shifted right after the pad."""
    import copy

    from finetune_helpers import token_batches

    from compressor.core.compress import compress_
    from compressor.core.ranks import RankPolicy
    from compressor.core.targets import find_targets, weight_readers
    from compressor.training.loop import FinetuneConfig, finetune

    teacher = build_tiny("t5", decoder_start_token_id=None)
    teacher.config.architectures = ["T5ForConditionalGeneration"]
    student = copy.deepcopy(teacher)
    targets = find_targets(student)
    for name in weight_readers(student, targets):  # T5's wo reads its .weight: stays dense
        del targets[name]
    compress_(student, targets, RankPolicy(keep=0.5), 2)
    config = FinetuneConfig(steps=2, lr=1e-3, objective="distill", mixed_precision="no")
    result = finetune(student, token_batches(2, length=8), teacher=teacher, config=config)
    assert result.steps == 2
