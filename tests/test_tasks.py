"""A model's task and its forward inputs (`core/tasks.py`): an encoder-decoder's decoder inputs
fall back to the pad token when the config has no start token, in `model_inputs` and in
fine-tuning alike, and with neither token the error is one line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny

from compressor.errors import DlncError


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
