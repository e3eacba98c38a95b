"""PEFT LoRA on a dlnc model: adapters on the factors, a training step that moves only them,
merge_and_unload back to a dlnc model of the same ranks that exports and reloads exactly;
PEFT's usual names and defaults through `lora_config`, saved and reloaded by plain PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from hf_helpers import compressed_export, inputs
from peft import LoraConfig, PeftModel, get_peft_model

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import factorized_layers
from compressor.errors import DlncError
from compressor.io.export import export
from compressor.io.load import load_pretrained
from compressor.training.lora import lora_config, lora_targets


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


@pytest.mark.parametrize(
    ("family", "given", "expected"),
    [
        ("llama", ["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj.down"),
        ("llama", None, "model.layers.0.self_attn.q_proj.down"),  # PEFT's default: q_proj, v_proj
        ("llama", r".*\.o_proj", "model.layers.0.self_attn.o_proj.down"),
        ("gpt2", None, "transformer.h.0.attn.c_attn.down"),  # PEFT's default: c_attn
        ("bert", None, "bert.encoder.layer.0.attention.self.query.down"),
    ],
)  # fmt: skip
def test_lora_config_maps_pefts_usual_names(family, given, expected, tmp_path):
    _, out = compressed_export(family, tmp_path)
    model = load_pretrained(out)
    config = lora_config(model, LoraConfig(r=2, target_modules=given))
    assert expected in config.target_modules and config.r == 2
    assert all(model.get_submodule(t) for t in config.target_modules)
    tuned = get_peft_model(model, config)  # plain PEFT takes it
    assert any("lora_A" in n for n, _ in tuned.named_parameters())


def test_plain_peft_refuses_the_usual_names_and_all_linear_works(tmp_path):
    """What lora_config is for: PEFT alone cannot wrap a FactorizedLinear; "all-linear" finds
    the factors by itself (they are nn.Linear) and is kept."""
    _, out = compressed_export("llama", tmp_path)
    with pytest.raises(ValueError, match="FactorizedLinear"):
        get_peft_model(load_pretrained(out), LoraConfig(target_modules=["q_proj"]))
    model = load_pretrained(out)
    config = LoraConfig(target_modules="all-linear")
    assert lora_config(model, config) is config
    tuned = get_peft_model(model, config)
    assert any("q_proj.down.lora_A" in n for n, _ in tuned.named_parameters())


def test_lora_config_train_step_save_and_reload(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path)
    config = lora_config(load_pretrained(out), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tuned = get_peft_model(load_pretrained(out), config)
    ids = inputs("llama")["input_ids"]
    with torch.no_grad():
        start = tuned(input_ids=ids).logits
    for p in tuned.parameters():  # lora_B starts at zero: move it so the step shows
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    tuned.eval()
    with torch.no_grad():
        trained = tuned(input_ids=ids).logits
    assert not torch.equal(trained, start)
    tuned.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_pretrained(out), tmp_path / "adapter")  # plain PEFT
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)
