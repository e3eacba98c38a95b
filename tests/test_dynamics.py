"""Ranks from learning dynamics: planted low-rank changes are found, by a warm-up run and by
a reference checkpoint; a model with no objective gets a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.linalg import singular_values
from compressor.core.targets import find_targets
from compressor.core.tasks import mask_tokens, model_inputs
from compressor.errors import DlncError
from compressor.io.checkpoint import load_checkpoint
from compressor.methods.dynamics import (
    joint_subspace,
    reference_updates,
    update_rank,
    warmup_loss,
    warmup_updates,
)
from tests.conftest import build_tiny


class Heads(nn.Module):
    """Three independent linear heads under one MSE loss: a change planted in one head is
    felt by that head only (in a sequential net every layer would share the fix)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(3))

    def forward(self, x, labels=None):
        y = torch.cat([h(x) for h in self.branches], -1)
        return {"logits": y, "loss": None if labels is None else F.mse_loss(y, labels)}


def low_rank(out_f: int, in_f: int, values: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(out_f, len(values), generator=g))
    q2, _ = torch.linalg.qr(torch.randn(in_f, len(values), generator=g))
    return q1 @ torch.diag(torch.tensor(values)) @ q2.T


def ranks_of(updates, targets) -> dict[str, int]:
    return {
        n: update_rank(singular_values(d), singular_values(targets[n].weight))
        for n, d in updates.items()
    }


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_warmup_finds_a_planted_rank_3_change(optimizer):
    torch.manual_seed(0)
    student, teacher = Heads(), Heads()
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():
        teacher.branches[1].weight += low_rank(16, 16, [1.0, 0.8, 0.6], seed=1)
        x = torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(2))
        batches = [{"x": b, "labels": teacher(b)["logits"]} for b in x]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    targets = find_targets(student)
    lr = 1e-2 if optimizer == "sgd" else 1e-3
    updates = warmup_updates(student, targets, batches, 40, lr=lr, optimizer=optimizer)
    assert ranks_of(updates, targets) == {"branches.0": 0, "branches.1": 3, "branches.2": 0}
    for k, v in student.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k])


def test_reference_checkpoint_pair_reveals_a_known_rank(tmp_path):
    base = build_tiny("gpt2")
    base.save_pretrained(tmp_path / "base")
    tuned = build_tiny("gpt2")
    layer = "transformer.h.1.mlp.c_fc"  # a Conv1D: weight stored in x out
    with torch.no_grad():
        tuned.get_submodule(layer).weight += low_rank(128, 32, [4.0, 3.0, 3.0, 2.0], seed=3).T
    tuned.save_pretrained(tmp_path / "tuned")
    model = load_checkpoint(tmp_path / "tuned").model
    reference = load_checkpoint(tmp_path / "base").model
    targets = find_targets(model)
    ranks = ranks_of(reference_updates(targets, reference), targets)
    assert ranks.pop(layer) == 4
    assert set(ranks.values()) == {0}


def test_reference_of_another_shape_is_an_error():
    model, other = build_tiny("gpt2"), build_tiny("llama")
    with pytest.raises(DlncError, match="not in the reference checkpoint"):
        reference_updates(find_targets(model), other)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_own_objective_of_each_head(family):
    model = build_tiny(family)
    batch = {
        "input_ids": torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(2, 10, dtype=torch.long),
    }
    batch["attention_mask"][1, 6:] = 0  # padding is not predicted
    loss = warmup_loss(model, has_labels=False, mask_token_id=3)(model, batch)
    if family == "bert":  # the same seeded draw of masked tokens, scored by the model itself
        masked = mask_tokens(batch, 3, generator=torch.Generator().manual_seed(0))
        own = model(**model_inputs(masked), labels=masked["mlm_labels"]).loss
    else:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        own = model(**batch, labels=labels).loss
    torch.testing.assert_close(loss, own, rtol=0, atol=0)  # bit for bit the model's own loss


def test_a_bare_encoder_warms_up_by_denoising_self_distillation():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=64))  # fmt: skip
    batch = {"input_ids": torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}  # fmt: skip
    loss_fn = warmup_loss(encoder, has_labels=False, mask_token_id=3)
    assert float(loss_fn(encoder.eval(), batch).detach()) > 0  # the masked input moves the output
    targets = find_targets(encoder)
    updates = warmup_updates(encoder, targets, [batch], steps=3, lr=1e-3, loss_fn=loss_fn)
    assert all(float(u.norm()) > 0 for u in updates.values())


def test_joint_subspace_holds_weight_and_update_directions():
    w = low_rank(20, 30, [5.0, 4.0], seed=5)
    dw = low_rank(20, 30, [1.0], seed=6)
    s, vh = joint_subspace(w, dw)
    assert int((s > 1e-6).sum()) == 3  # the 2 + 1 directions, nothing else
    q = vh[:3].T
    torch.testing.assert_close(w.double() @ q @ q.T, w.double())
    torch.testing.assert_close(dw.double() @ q @ q.T, dw.double())
