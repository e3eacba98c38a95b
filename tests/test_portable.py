"""Portable exports: a factorized export carries modeling_dlnc.py and an `auto_map`, so
`AutoModel*.from_pretrained(export, trust_remote_code=True)` loads it where dlnc cannot be
imported, with outputs equal bit for bit to `load_pretrained`'s (GPT-2, Llama with grouped-query
attention, BERT; in memory, streamed and sharded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from hf_helpers import compressed_export, inputs

from compressor.io.load import load_pretrained
from compressor.io.portable import auto_class_for, auto_map

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import export_check  # noqa: E402


def run_check(folder: Path, tmp_path: Path) -> list[str]:
    """tests/scripts/export_check.py check, in a process where `import compressor` fails."""
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "export_check.py"), "check", str(folder), "--without-dlnc"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


def test_exports_load_without_dlnc_bit_for_bit(tmp_path, one_torch_thread):
    for family in ("gpt2", "llama", "bert"):
        compressed_export(family, tmp_path)
        export_check.record(tmp_path, f"{family}-dlnc", inputs(family))
    export_check.write(tmp_path, {"bert-streamed": export_check.CASES["bert-streamed-sharded"]})
    export_check.write(tmp_path, {"gpt2-int4": export_check.CASES["gpt2-int4"]})
    assert len(list((tmp_path / "bert-streamed").glob("model-*.safetensors"))) > 1
    lines = run_check(tmp_path, tmp_path)
    assert lines[0].endswith("dlnc no")
    assert lines[1:] == [
        "gpt2-dlnc: AutoModelForCausalLM through trust_remote_code: equal bit for bit",
        "llama-dlnc: AutoModelForCausalLM through trust_remote_code: equal bit for bit",
        "bert-dlnc: AutoModelForMaskedLM through trust_remote_code: equal bit for bit",
        "bert-streamed: AutoModelForMaskedLM through trust_remote_code: equal bit for bit",
        "gpt2-int4: AutoModelForCausalLM through trust_remote_code: equal bit for bit",
    ]


def test_an_export_names_its_loader(tmp_path):
    _, out = compressed_export("llama", tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dlnc.DlncModelForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_dlnc.DlncModel"
    assert config["auto_map"]["AutoConfig"] == "modeling_dlnc.DlncConfig"
    assert "AutoModelForMaskedLM" not in config["auto_map"]  # transformers has none for Llama
    card = (out / "README.md").read_text()
    assert (
        'AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)'
        in card
    )
    assert "pip install dlnc" not in card
    module = (out / "modeling_dlnc.py").read_text()
    imported = {
        line.split()[1] for line in module.splitlines() if line.startswith(("import", "from"))
    }
    allowed = {"__future__", "copy", "json", "shutil", "functools", "pathlib", "types", "torch"}
    assert imported <= allowed | {"transformers"}  # nothing of dlnc


def test_with_dlnc_installed_trust_remote_code_loads_the_same(tmp_path, one_torch_thread):
    _, out = compressed_export("gpt2", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, local_files_only=True
    )
    assert type(model) is tf.GPT2LMHeadModel
    ours = load_pretrained(out)
    batch = inputs("gpt2")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ours(**batch).logits)


def test_the_remote_config_leaves_out_what_needs_dlnc(tmp_path):
    """Tools that read `quantization_config` from the config alone (lm-eval's HFLM) take the
    export with trust_remote_code=True; without it the config is the export's as written."""
    _, out = compressed_export("gpt2", tmp_path)
    config = tf.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config) is tf.GPT2Config and config.dlnc["layers"]
    assert not hasattr(config, "quantization_config")
    assert not hasattr(config, "transformers_weights")
    assert hasattr(tf.AutoConfig.from_pretrained(out), "quantization_config")


def test_saving_a_portable_load_writes_an_export(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    first = json.loads((out / "config.json").read_text())
    for key in ("dlnc", "quantization_config", "transformers_weights", "auto_map"):
        assert again[key] == first[key], key
    assert (tmp_path / "again" / "modeling_dlnc.py").is_file()
    batch = inputs("llama")
    with torch.no_grad():
        assert torch.equal(
            load_pretrained(tmp_path / "again")(**batch).logits, model(**batch).logits
        )


def test_a_merged_export_needs_no_loader(tmp_path):
    """Also from a model loaded from a factorized export (its config has dlnc's auto_map)."""
    from compressor.io.export import export

    _, factorized = compressed_export("gpt2", tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(factorized)
    out = export(model, tmp_path / "merged", config=model.config, format="dense")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "modeling_dlnc.py").exists()
    model.dequantize()
    model.save_pretrained(tmp_path / "dequantized")
    assert "auto_map" not in json.loads((tmp_path / "dequantized" / "config.json").read_text())


AUTO = {
    "gpt2": "AutoModelForCausalLM",
    "bert": "AutoModelForMaskedLM",
    "vit": "AutoModelForImageClassification",
}


@pytest.mark.parametrize("family", list(AUTO))
def test_auto_class_for_the_architecture(family):
    from conftest import build_tiny

    model = build_tiny(family)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    assert auto_class_for(model.config) == AUTO[family]


def test_a_config_with_its_own_remote_code_keeps_it():
    config = tf.GPT2Config(auto_map={"AutoModelForCausalLM": "my_modeling.MyModel"})
    assert auto_map(config) == {}
