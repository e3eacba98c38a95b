"""The accelerate fine-tuning loop on tiny models: it learns, exports, resumes exactly, and
stops cleanly on a NaN."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
from conftest import build_tiny
from finetune_helpers import compressed, token_batches

from compressor.core.surgery import deepen_, factorized_layers
from compressor.errors import DlncError
from compressor.io.export import export
from compressor.io.load import load_pretrained
from compressor.training.loop import (
    FinetuneConfig,
    FinetuneInterrupted,
    NonFiniteLoss,
    finetune,
    latest_checkpoint,
)


@pytest.fixture(scope="module")
def gpt2_pair():
    teacher = build_tiny("gpt2")
    return teacher, compressed(teacher)


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_distillation_loss_falls_and_export_reloads_identically(gpt2_pair, tmp_path):
    teacher, student = gpt2_pair
    batches = token_batches(6)
    config = FinetuneConfig(steps=40, lr=3e-3, warmup=0.1, seed=0)
    result = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                      eval_batches=batches[:2])  # fmt: skip
    assert len(result.losses) == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first
    assert result.evals["after"].distill < result.evals["before"].distill
    assert result.evals["original"].distill == pytest.approx(0.0, abs=1e-9)
    out = export(result.model, tmp_path / "out", config=result.model.config)
    reloaded = load_pretrained(out)
    torch.testing.assert_close(_logits(reloaded, batches[0]), _logits(result.model, batches[0]))


def test_depth3_with_outer_lr_exports_two_factors_with_identical_logits(gpt2_pair, tmp_path):
    teacher, student = gpt2_pair
    batches = token_batches(4)
    config = FinetuneConfig(steps=8, lr=1e-3, depth=3, outer_lr_scale=4.0)
    result = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config)
    layers = factorized_layers(result.model)
    assert {layer.depth for layer in layers.values()} == {3}
    moved = [(layer.mid[0].weight - torch.eye(layer.rank)).abs().max() for layer in layers.values()]
    assert max(moved) > 0  # the inner factor trained too
    out = export(result.model, tmp_path / "out", config=result.model.config)
    reloaded = load_pretrained(out)
    assert {layer.depth for layer in factorized_layers(reloaded).values()} == {2}
    torch.testing.assert_close(_logits(reloaded, batches[0]), _logits(result.model, batches[0]))


def test_outer_factors_get_the_discrepant_learning_rate(gpt2_pair):
    from compressor.training.loop import _param_groups

    _, student = gpt2_pair
    model = deepen_(copy.deepcopy(student), 3)
    groups = _param_groups(model, FinetuneConfig(lr=1e-3, outer_lr_scale=5.0))
    outer = {id(p) for g in groups if g["lr"] == pytest.approx(5e-3) for p in g["params"]}
    layer = next(iter(factorized_layers(model).values()))
    assert id(layer.up.weight) in outer and id(layer.down.weight) in outer
    assert id(layer.mid[0].weight) not in outer


def test_deepen_keeps_the_map(gpt2_pair):
    _, student = gpt2_pair
    batch = token_batches(1)[0]
    deep = deepen_(copy.deepcopy(student), 4)
    assert {layer.depth for layer in factorized_layers(deep).values()} == {4}
    torch.testing.assert_close(_logits(deep, batch), _logits(student, batch))


def test_resume_after_interrupt_ends_with_the_same_weights(gpt2_pair, tmp_path):
    teacher, student = gpt2_pair
    batches = token_batches(5)  # 5 batches, accumulation 2: epochs end mid-step
    config = FinetuneConfig(steps=7, lr=3e-3, save_every=2, grad_accum=2, depth=3,
                            outer_lr_scale=2.0, objective="mix")  # fmt: skip
    full = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                    state_dir=tmp_path / "a")  # fmt: skip

    def ctrl_c_at_step_3(stage, done, total, **metrics):
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(FinetuneInterrupted, match="`resume`"):
        finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                 state_dir=tmp_path / "b", progress=ctrl_c_at_step_3)  # fmt: skip
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000003"
    resumed = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                       state_dir=tmp_path / "b", resume=True)  # fmt: skip
    assert resumed.resumed_from == 3
    assert resumed.losses == full.losses
    assert resumed.history == full.history  # each step's loss and lr, across the resume
    assert [h["step"] for h in full.history] == list(range(1, 8))
    # the lr of each update: warm-up to 3e-3 (0 steps here), then cosine decay (7 steps)
    expected = [3e-3 * 0.5 * (1 + math.cos(math.pi * i / 7)) for i in range(7)]
    assert [h["lr"] for h in full.history] == pytest.approx(expected, rel=1e-9)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_refuses_a_changed_schedule(gpt2_pair, tmp_path):
    teacher, student = gpt2_pair
    batches = token_batches(2)
    config = FinetuneConfig(steps=2, save_every=2)
    finetune(copy.deepcopy(student), batches, teacher=teacher, config=config, state_dir=tmp_path)
    with pytest.raises(DlncError, match="`steps` was 2"):
        finetune(copy.deepcopy(student), batches, teacher=teacher,
                 config=FinetuneConfig(steps=4), state_dir=tmp_path, resume=True)  # fmt: skip


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(gpt2_pair, tmp_path):
    teacher, student = gpt2_pair
    model = copy.deepcopy(student)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:  # the 5th student forward: step 5
            output.logits = output.logits * float("nan")
        return output

    model.register_forward_hook(poison)
    config = FinetuneConfig(steps=10, save_every=2, lr=1e-3)
    with pytest.raises(NonFiniteLoss, match=r"step 5 .*checkpoint-0000004"):
        finetune(model, token_batches(3), teacher=teacher, config=config, state_dir=tmp_path)
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000004"
    assert not list(tmp_path.glob(".checkpoint-*"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_task_only_training_on_a_causal_lm_without_teacher(gpt2_pair):
    _, student = gpt2_pair
    batches = token_batches(2, pad_last=True)
    config = FinetuneConfig(steps=20, lr=1e-2, objective="task", trainable="factors")
    model = copy.deepcopy(student)
    embeddings = model.transformer.wte.weight.detach().clone()
    result = finetune(model, batches, config=config, eval_batches=batches)
    assert result.evals["after"].loss < result.evals["before"].loss
    assert set(result.evals) == {"before", "after"}
    torch.testing.assert_close(result.model.transformer.wte.weight, embeddings)  # frozen


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "`steps` must be >= 1"),
        ("lr", 0.0, "`lr` must be > 0"),
        ("warmup", 1.0, "`warmup` must be in"),
        ("depth", 1, "`depth` must be >= 2"),
        ("objective", "kd", "`objective` must be one of"),
        ("mixed_precision", "fp32", "`mixed_precision` must be one of"),
        ("clip", -1.0, "`clip` must be > 0"),
    ],
)
def test_config_names_the_bad_field(field, value, message):
    with pytest.raises(DlncError, match=message):
        FinetuneConfig(**{field: value})


def test_training_that_only_hurts_returns_the_start(gpt2_pair):
    teacher, student = gpt2_pair
    start = copy.deepcopy(student)
    batches = token_batches(4)
    config = FinetuneConfig(steps=8, lr=5.0, warmup=0.0, clip=None, seed=0)  # far too high
    result = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                      eval_batches=batches[:2])  # fmt: skip
    assert result.kept_start
    assert result.evals["trained"].distill > result.evals["before"].distill
    assert result.evals["after"] == result.evals["before"]
    pairs = zip(result.model.state_dict().items(), start.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, msg=name)


def test_training_that_helps_keeps_the_trained_model(gpt2_pair):
    teacher, student = gpt2_pair
    batches = token_batches(6)
    config = FinetuneConfig(steps=20, lr=3e-3, seed=0)
    result = finetune(copy.deepcopy(student), batches, teacher=teacher, config=config,
                      eval_batches=batches[:2])  # fmt: skip
    assert not result.kept_start and "trained" not in result.evals
    assert result.evals["after"].distill < result.evals["before"].distill


def test_the_teacher_is_given_back_trainable_and_in_its_mode():
    # Distilling several students from one original must not leave it frozen: its flags and
    # mode are frozen while training and given back after.
    teacher = build_tiny("gpt2").train()
    teacher.transformer.wte.weight.requires_grad_(False)  # a flag of the caller's own
    flags = [p.requires_grad for p in teacher.parameters()]
    result = finetune(compressed(teacher), token_batches(2), teacher=teacher,
                      config=FinetuneConfig(steps=2, seed=0))  # fmt: skip
    assert len(result.losses) == 2
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert teacher.training
