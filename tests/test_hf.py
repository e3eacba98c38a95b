"""from_pretrained loads dlnc exports through the registered quantizer: outputs identical to
load_pretrained on every shipped family, dtype and device_map honoured, save_pretrained writes
an equivalent export, and without dlnc the load fails loudly instead of going random."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf
from conftest import build_tiny
from hf_helpers import compressed_export, inputs

from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import factorized_layers
from compressor.io.export import LOAD_GUARD
from compressor.io.load import load_pretrained

AUTO = {
    "gpt2": tf.AutoModelForCausalLM,
    "llama": tf.AutoModelForCausalLM,
    "bert": tf.AutoModelForMaskedLM,
    "vit": tf.AutoModelForImageClassification,
    "t5": tf.AutoModelForSeq2SeqLM,
}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def ranks(model):
    return {n: m.rank for n, m in factorized_layers(model).items()}


@pytest.mark.parametrize("family", list(AUTO))
def test_from_pretrained_equals_load_pretrained(family, tmp_path, one_torch_thread):
    compressed, out = compressed_export(family, tmp_path)
    ours, theirs = load_pretrained(out), AUTO[family].from_pretrained(out)
    assert type(theirs) is type(ours) and ranks(theirs) == ranks(ours) == ranks(compressed)
    batch = inputs(family)
    assert torch.equal(logits(theirs, batch), logits(ours, batch))
    assert torch.equal(logits(theirs, batch), logits(compressed, batch))


def test_config_json_carries_the_quantization_config(tmp_path):
    _, out = compressed_export("llama", tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "dlnc", "format_version": 1}
    assert config["transformers_weights"] == LOAD_GUARD
    assert config["dlnc"]["layers"]  # the layer table: one source of truth


def test_automodel_loads_the_base_of_a_head_models_export(tmp_path, one_torch_thread):
    _, out = compressed_export("gpt2", tmp_path)
    base = tf.AutoModel.from_pretrained(out)
    assert isinstance(base, tf.GPT2Model) and factorized_layers(base)
    full = load_pretrained(out)
    batch = inputs("gpt2")
    with torch.no_grad():
        expected = full.transformer(**batch).last_hidden_state
        assert torch.equal(base(**batch).last_hidden_state, expected)


def test_dtype_and_device_map_are_honoured(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path)
    half = tf.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    layer = next(iter(factorized_layers(half).values()))
    assert layer.up.weight.dtype == torch.bfloat16 and layer.up.weight.device.type == "cpu"
    ours = load_pretrained(out, dtype=torch.bfloat16, device_map={"": "cpu"})
    batch = inputs("llama")
    assert torch.equal(logits(half, batch), logits(ours, batch))


def test_the_dense_weights_are_never_allocated(tmp_path, monkeypatch):
    """The skeleton is built on the meta device: no FactorizedLinear replaces a real tensor."""
    _, out = compressed_export("bert", tmp_path)
    import compressor.io.install as install_module

    replaced = []
    original = install_module.replace_module

    def spy(model, name, new):
        old = original(model, name, new)
        replaced.append(old.weight.device.type)
        return old

    monkeypatch.setattr(install_module, "replace_module", spy)
    tf.AutoModelForMaskedLM.from_pretrained(out)
    assert replaced and set(replaced) == {"meta"}


def test_save_pretrained_writes_an_equivalent_export(tmp_path, one_torch_thread):
    _, out = compressed_export("gpt2", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    first = json.loads((out / "config.json").read_text())
    for key in ("dlnc", "quantization_config", "transformers_weights", "auto_map"):
        assert again[key] == first[key]
    assert (tmp_path / "again" / "modeling_dlnc.py").is_file()  # loads without dlnc too
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    batch = inputs("gpt2")
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_dequantize_gives_the_dense_model(tmp_path, one_torch_thread):
    compressed, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    model.dequantize()
    assert not factorized_layers(model) and not hasattr(model.config, "quantization_config")
    batch = inputs("llama")
    torch.testing.assert_close(logits(model, batch), logits(compressed, batch))


def test_pipeline_loads_an_export(tmp_path, one_torch_thread):
    compressed, out = compressed_export("llama", tmp_path, tokenizer=True)
    generate = tf.pipeline("text-generation", model=str(out))
    assert any(isinstance(m, FactorizedLinear) for m in generate.model.modules())
    got = generate("w1 w2 w3", max_new_tokens=4, do_sample=False, return_tensors=True)
    ids = generate.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    expected = compressed.generate(ids, max_new_tokens=4, do_sample=False)
    assert list(got[0]["generated_token_ids"]) == expected[0].tolist()


def test_loading_without_dlnc_fails_loudly(tmp_path):
    """transformers alone (compressor never imported) stops with a message naming dlnc, for an
    export and for a save_pretrained copy of a loaded one."""
    _, out = compressed_export("gpt2", tmp_path)
    tf.AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "again")
    code = (
        "import sys, transformers as tf\n"
        "for folder in sys.argv[1:]:\n"
        "    try:\n"
        "        tf.AutoModelForCausalLM.from_pretrained(folder)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, str(e).replace(chr(10), ' '))\n"
        "    else:\n"
        "        print('loaded')\n"
        "print(any(m.startswith('compressor') for m in sys.modules))\n"
    )
    env = {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "again")],
        capture_output=True, text=True, check=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines[-1] == "False" and len(lines) == 3
    for line in lines[:2]:
        assert line.startswith("ValueError") and "`trust_remote_code=True`" in line, line
        assert "`import compressor`" in line and "pip install dlnc" not in line


@pytest.mark.parametrize("hook", ["update_attn_implementation", "update_tp_plan", "update_ep_plan"])
def test_every_early_config_hook_drops_the_guard(hook):
    """transformers >= 5.18 calls the first before looking up the weights, 5.0-5.19 the others
    (tests/scripts/export_check.py proves the lowest accepted version in CI)."""
    from compressor.io.hf import DlncHfQuantizer, DlncQuantizationConfig

    config = tf.GPT2Config(transformers_weights=LOAD_GUARD)
    quantizer = DlncHfQuantizer(DlncQuantizationConfig())
    assert not hasattr(getattr(quantizer, hook)(config), "transformers_weights")
    kept = getattr(quantizer, hook)(tf.GPT2Config(transformers_weights="model.safetensors"))
    assert kept.transformers_weights == "model.safetensors"


def test_import_registers_lazily():
    code = (
        "import sys, compressor\n"
        "print('transformers.quantizers.auto' in sys.modules)\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "print(M['dlnc'].__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["False", "DlncHfQuantizer"]


@pytest.mark.parametrize("first", ["compressor", "compressor.io.hf", "compressor.io.load"])
def test_a_fresh_process_loads_an_export_whatever_it_imports_first(first, tmp_path):
    # load_pretrained imports compressor.io.hf, which imports transformers' quantizers, whose
    # import hook registers dlnc by importing compressor.io.hf: no circular ImportError.
    _, folder = compressed_export("gpt2", tmp_path)
    code = (
        f"import {first}\n"
        "from compressor.io.load import load_pretrained\n"
        f"model = load_pretrained({str(folder)!r})\n"
        "from transformers import AutoModelForCausalLM\n"
        f"again = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "print(type(again.transformer.h[0].mlp.c_fc).__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "FactorizedLinear"


def test_an_export_without_quantization_config_still_loads(tmp_path, one_torch_thread):
    """Exports written before the quantizer existed: load_pretrained supplies the config."""
    compressed, out = compressed_export("bert", tmp_path)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"], config["transformers_weights"]
    (out / "config.json").write_text(json.dumps(config))
    batch = inputs("bert")
    assert torch.equal(logits(load_pretrained(out), batch), logits(compressed, batch))


def test_dense_source_is_untouched_by_the_quantizer(tmp_path):
    """A plain checkpoint still loads as a plain model with compressor imported."""
    build_tiny("bert").save_pretrained(tmp_path / "plain")
    model = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / "plain")
    assert not factorized_layers(model) and not getattr(model, "is_quantized", False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_with_kv_cache_matches_the_exported_model(
    family, tmp_path, one_torch_thread
):
    compressed, out = compressed_export(family, tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    prompt = inputs(family)["input_ids"][:, :5]
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = reloaded.generate(prompt, use_cache=True, **settings)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, compressed.generate(prompt, use_cache=True, **settings))
    assert torch.equal(cached, reloaded.generate(prompt, use_cache=False, **settings))


def test_compile_fullgraph_runs_through_factorized_layers(tmp_path, one_torch_thread):
    """fullgraph=True raises at the first graph break, so this proves there is none (the eager
    backend: dynamo's tracing is what breaks graphs; code generation is not under test)."""
    _, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    batch = {"input_ids": inputs("llama")["input_ids"], "use_cache": False}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, model(**batch).logits)


def test_a_loaded_model_exports_merged_as_a_plain_checkpoint(tmp_path, one_torch_thread):
    """No stale quantization_config: the merged export of a from_pretrained model is plain."""
    from compressor.io.export import export

    compressed, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    merged = export(model, tmp_path / "merged", config=model.config, format="dense")
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and "transformers_weights" not in config
    plain = tf.AutoModelForCausalLM.from_pretrained(merged)
    assert not factorized_layers(plain) and not getattr(plain, "is_quantized", False)
    batch = inputs("llama")
    torch.testing.assert_close(logits(plain, batch), logits(compressed, batch))


def test_trainer_accepts_a_dlnc_model_for_full_training(tmp_path):
    from transformers.trainer_utils import validate_quantization_for_training

    _, out = compressed_export("llama", tmp_path)
    validate_quantization_for_training(tf.AutoModelForCausalLM.from_pretrained(out))
