"""Losses: the maths on bare tensors, and which objective applies to which model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny
from finetune_helpers import compressed, token_batches

from compressor.core.tasks import mask_tokens
from compressor.errors import DlncError
from compressor.training.objectives import (
    build_objective,
    check_params,
    hidden_mse,
    kl_logits,
    objective_names,
    unregister_objective,
)


def test_kl_is_zero_on_equal_logits_and_matches_torch_otherwise():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert kl_logits(t, t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    expected = (
        F.kl_div(
            F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum"
        )
        / 10
        * 4
    )  # per token, times T^2
    torch.testing.assert_close(kl_logits(s, t, mask, 2.0), expected)


def test_padding_does_not_count():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    mask = torch.tensor([[True, True, False, False]])
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[0, 2:] += 100.0
    torch.testing.assert_close(
        kl_logits(garbage_s, garbage_t, mask, 1.0), kl_logits(s, t, mask, 1.0)
    )
    torch.testing.assert_close(hidden_mse(garbage_s, t, mask), hidden_mse(s, t, mask))
    torch.testing.assert_close(hidden_mse(s, t, mask), (s - t)[0, :2].pow(2).mean())


def test_mask_tokens_never_masks_specials_or_padding():
    batch = token_batches(1, rows=8, length=12, pad_last=True)[0]
    out = mask_tokens(batch, mask_token_id=99, probability=1.0)
    masked = out["input_ids"] == 99
    assert not masked[:, 0].any() and not masked[:-1, -1].any()  # [CLS], [SEP] of full rows
    assert not masked[-1, 5:].any()  # last real token of the padded row, and its padding
    assert masked[:, 1:5].all()
    assert (out["mlm_labels"][masked] == batch["input_ids"][masked]).all()
    assert (out["mlm_labels"][~masked] == -100).all()


def test_mix_is_the_weighted_sum():
    teacher = build_tiny("gpt2")
    student = compressed(teacher)
    batch = token_batches(1)[0]
    mix = build_objective("mix", student, teacher, mix_weight=0.3)
    parts = mix(student, batch, teacher)
    assert parts.loss.item() == pytest.approx(
        0.3 * parts.parts["distill"] + 0.7 * parts.parts["task"]
    )
    assert "KL on logits" in mix.describe() and "causal lm" in mix.describe()


def test_encoder_without_head_distils_hidden_states():
    teacher = build_tiny("bert").bert
    objective = build_objective("distill", compressed(teacher), teacher)
    assert objective.distill_on == "hidden"


@pytest.mark.parametrize(
    ("kind", "student", "teacher", "labels", "message"),
    [
        ("distill", "gpt2", None, False, "give `teacher`"),
        ("task", "encoder", None, False, "has no task head"),
        ("task", "vit", None, False, "needs labels"),
        ("distill", "gpt2", "encoder", False, "the teacher needs the same head"),
        ("task", "gpt2", None, False, None),
        ("task", "vit", None, True, None),
    ],
)
def test_what_applies_and_what_does_not(kind, student, teacher, labels, message):
    def make(name):
        return build_tiny("bert").bert if name == "encoder" else build_tiny(name)

    teacher_model = make(teacher) if teacher else None
    if message is None:
        assert build_objective(kind, make(student), teacher_model, has_labels=labels).kind == kind
        return
    with pytest.raises(DlncError, match=message):
        build_objective(kind, make(student), teacher_model, has_labels=labels)


def test_seq2seq_distills_on_teacher_forced_logits():
    import transformers as tf

    from compressor.core.tasks import model_inputs
    from compressor.errors import DlncError
    from compressor.training.objectives import build_objective

    torch.manual_seed(0)
    config = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, vocab_size=50,
                         decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    teacher = tf.T5ForConditionalGeneration(config).eval()
    batch = {"input_ids": torch.randint(1, 50, (2, 7)), "attention_mask": torch.ones(2, 7).long()}
    inputs = model_inputs(batch, teacher)
    assert torch.equal(inputs["decoder_input_ids"][:, 1:], batch["input_ids"][:, :-1])
    objective = build_objective("distill", teacher, teacher)
    assert objective.task == "seq2seq_lm" and objective.distill_on == "logits"
    assert float(objective(teacher, batch, teacher).loss.detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DlncError, match="seq2seq task loss"):
        build_objective("task", teacher, teacher)


# ---- the registry: a new objective with a parameter is one registered definition ----------


@pytest.fixture
def toy_objective():
    """A task loss scaled by `toy_scale` (default 1, must be > 0)."""
    from compressor.training.objectives import ObjectiveDef, Param, register_objective

    scale = Param("toy_scale", 1.0, low=0.0, low_open=True, help="multiplies the task loss")
    register_objective(ObjectiveDef(
        "toy", uses_teacher=False, uses_task=True, params=(scale,),
        combine=lambda parts, p: p["toy_scale"] * parts["task"],
        describe=lambda d, t, p: f"toy: {p['toy_scale']:g} x {t}",
    ))  # fmt: skip
    yield "toy"
    unregister_objective("toy")


def test_a_registered_objective_and_its_parameter_reach_config_recipe_and_loss(toy_objective):
    from compressor.recipes.schema import parse_recipe
    from compressor.training.loop import FinetuneConfig, finetune

    assert "toy" in objective_names()
    assert parse_recipe("finetune: {objective: toy}").finetune.objective == "toy"
    with pytest.raises(DlncError, match=r"`toy_scale` must be > 0, got 0"):
        FinetuneConfig(objective="toy", objective_params={"toy_scale": 0})
    student = compressed(build_tiny("gpt2"))
    for module in student.modules():  # training mode then gives the same loss as eval mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = token_batches(1)[0]
    plain = build_objective("task", student)(student, batch).loss.detach()
    toy = build_objective("toy", student, toy_scale=0.25)
    torch.testing.assert_close(toy(student, batch).loss, 0.25 * plain)
    assert toy.describe() == "toy: 0.25 x causal lm"
    config = FinetuneConfig(steps=3, lr=1e-2, objective="toy", objective_params={"toy_scale": 0.25},
                            mixed_precision="no", shuffle=False)  # fmt: skip
    result = finetune(student, [batch], config=config)
    assert result.losses[0] == pytest.approx(0.25 * float(plain), rel=1e-5)
    assert result.losses[-1] < result.losses[0] and result.objective.startswith("toy")


def test_unregistered_objectives_and_parameters_are_refused(toy_objective):
    from compressor.training.loop import FinetuneConfig

    unregister_objective("toy")
    with pytest.raises(DlncError, match="`objective` must be one of distill, task, mix, got 'toy'"):
        FinetuneConfig(objective="toy")
    with pytest.raises(DlncError, match="unknown parameter 'toy_scale'"):
        FinetuneConfig(objective_params={"toy_scale": 1.0})
    assert set(check_params({})) == {"temperature", "mix_weight"}


@pytest.mark.parametrize(
    ("params", "message"),
    [({"temperature": 0.0}, r"`temperature` must be > 0, got 0.0"),
     ({"mix_weight": 1.5}, r"`mix_weight` must be in \[0, 1\], got 1.5"),
     ({"mix_weight": "half"}, r"`mix_weight` must be a number")],
)  # fmt: skip
def test_shipped_parameters_are_range_checked(params, message):
    with pytest.raises(DlncError, match=message):
        check_params(params)
