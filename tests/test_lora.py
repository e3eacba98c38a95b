"""PEFT LoRA on a dlnc model: adapters on the factors, a training step that moves only them,
merge_and_unload back to a dlnc model of the same ranks that exports and reloads exactly."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hf_helpers import compressed_export, inputs
from peft import LoraConfig, get_peft_model

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import factorized_layers
from compressor.errors import DlncError
from compressor.io.export import export
from compressor.training.lora import lora_targets


def ranks(model):
    return {n: m.rank for n, m in factorized_layers(model).items()}


def test_targets_name_the_factors_of_factorized_layers(tmp_path):
    _, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    targets = lora_targets(model, ["q_proj", "v_proj"])
    assert targets[:2] == [
        "model.layers.0.self_attn.q_proj.down",
        "model.layers.0.self_attn.q_proj.up",
    ]
    assert all(isinstance(model.get_submodule(t), torch.nn.Linear) for t in targets)
    # GQA's v_proj (32 -> 16) stays dense at keep 0.5: LoRA goes on the layer itself
    assert "model.layers.1.self_attn.v_proj" in targets
    assert len(targets) == 2 * 3  # 2 layers x (q.down, q.up, v)
    with pytest.raises(DlncError, match="`names`"):
        lora_targets(model, ["nothing_here"])


def test_lora_train_step_merge_export_reload(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    before = ranks(model)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=lora_targets(model, ["q_proj", "v_proj"]))
    peft_model = get_peft_model(model, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}

    # 1) one step of next-token training moves the adapters, nothing else
    ids = inputs("llama")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits

    # 2) merged back: a dlnc model of the same ranks, same outputs
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, tf.LlamaForCausalLM) and ranks(merged) == before
    assert all(isinstance(m, FactorizedLinear) for m in factorized_layers(merged).values())
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    torch.testing.assert_close(logits, tuned)

    # 3) it exports and reloads exactly
    again = export(merged, tmp_path / "tuned", config=merged.config)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(again)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
