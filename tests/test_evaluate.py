"""Held-out evaluation: the numbers agree with transformers' own losses and ignore padding."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny
from finetune_helpers import compressed, token_batches

from compressor.errors import DlncError
from compressor.training.evaluate import evaluate


def test_causal_lm_loss_and_perplexity_match_transformers():
    model = build_tiny("gpt2")
    batches = token_batches(3)
    with torch.no_grad():
        expected = sum(model(**b, labels=b["input_ids"]).loss.item() for b in batches) / 3
    result = evaluate(model, batches)
    assert result.task == "causal_lm" and result.samples == 12
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_padding_does_not_change_the_loss():
    model = build_tiny("gpt2")
    padded = token_batches(1, pad_last=True)[0]
    # the same tokens as separate unpadded batches
    full = {k: v[:-1] for k, v in padded.items()}
    short = {k: v[-1:, :8] for k, v in padded.items()}
    with torch.no_grad():
        n_full, n_short = full["input_ids"].numel() - 3, 7  # predicted tokens
        total = (model(**full, labels=full["input_ids"]).loss * n_full
                 + model(**short, labels=short["input_ids"]).loss * n_short)  # fmt: skip
    result = evaluate(model, [padded])
    assert result.loss == pytest.approx(total.item() / (n_full + n_short), rel=1e-5)


def test_the_original_against_itself_is_exact():
    teacher = build_tiny("bert").bert
    result = evaluate(teacher, token_batches(2, pad_last=True), teacher)
    assert result.task is None and result.loss is None
    assert result.distill == pytest.approx(0.0, abs=1e-12)
    assert result.cosine == pytest.approx(1.0, abs=1e-6)


def test_compressed_encoder_is_further_from_the_original():
    teacher = build_tiny("bert").bert
    result = evaluate(compressed(teacher, keep=0.2), token_batches(2), teacher)
    assert result.distill > 0 and result.cosine < 1.0


def test_masked_lm_masks_the_same_tokens_every_time():
    model = build_tiny("bert")
    batches = token_batches(2)
    a = evaluate(model, batches, mask_token_id=3, seed=5)
    b = evaluate(model, batches, mask_token_id=3, seed=5)
    other = evaluate(model, batches, mask_token_id=3, seed=6)
    assert a.loss == b.loss and other.loss != a.loss  # the seed picks the tokens
    assert a.perplexity == pytest.approx(math.exp(a.loss))  # pseudo-perplexity


def test_classification_accuracy():
    model = build_tiny("vit")
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(6, 3, 16, 16, generator=g)}
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    batch["labels"] = predicted.clone()
    batch["labels"][:3] = (predicted[:3] + 1) % 3
    assert evaluate(model, [batch]).accuracy == pytest.approx(0.5)


def test_nothing_to_score_is_a_clear_error():
    with pytest.raises(DlncError, match="give `teacher`"):
        evaluate(build_tiny("bert").bert, token_batches(1))
