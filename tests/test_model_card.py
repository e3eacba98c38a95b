"""Every export writes a model card: Hub metadata (the base card's carried over), a compression
table whose numbers match the files (parameters and bytes before/after), the held-out numbers,
the chain of commands with the dlnc version, and how to load it with the model's library."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import build_tiny
from hf_helpers import compressed_export
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from compressor.core.compress import compress_
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import count_params
from compressor.core.targets import find_targets
from compressor.io.card_facts import card_facts
from compressor.io.checkpoint import load_checkpoint
from compressor.io.export import export
from compressor.io.model_card import base_model_id, model_card


def stored(folder):
    state = load_file(folder / "model.safetensors")
    return sum(t.numel() for t in state.values()), sum(t.nbytes for t in state.values())


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_card_numbers_match_the_files(family, tmp_path):
    compressed, out = compressed_export(family, tmp_path)
    facts = card_facts(compressed, "svd", format="factors", report=None)
    assert (facts.params_after, facts.bytes_after) == stored(out)
    dense = build_tiny(family)
    assert (facts.params_before, facts.bytes_before) == stored(tmp_path / f"{family}-dense")
    assert facts.params_before == count_params(dense)
    text = (out / "README.md").read_text()
    assert f"| parameters | {facts.params_before:,} | {facts.params_after:,} |" in text
    assert f"| weight bytes | {facts.bytes_before:,} | {facts.bytes_after:,} |" in text


def test_card_metadata_command_and_loading(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    source = tmp_path / "hub" / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    build_tiny("gpt2").save_pretrained(source)
    out = str(tmp_path / "out")
    argv = ["dlnc", "compress", str(source), "--keep", "0.5", "--out", out, "--no-generate"]
    monkeypatch.setattr(sys, "argv", argv)
    result = CliRunner().invoke(app, argv[1:])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "acme/tiny-gpt2"
    assert card.data.library_name == "transformers"
    assert {"dlnc", "low-rank", "compressed"} <= set(card.data.tags)
    assert f"dlnc compress {source} --keep 0.5 --out {out} --no-generate" in card.text
    assert "method `svd`, keep 0.5" in card.text
    assert "| `transformer.h.*.attn.c_attn` | 96 x 32 | 2 |" in card.text
    assert "import compressor" in card.text
    assert "import compressor  # dlnc (from its source)" in card.text
    assert "pip install dlnc" not in card.text
    assert "AutoModelForCausalLM.from_pretrained" in card.text
    assert card.data.base_model_relation == "quantized"
    assert card.data.pipeline_tag == "text-generation"


def test_merged_and_tensor_mode_cards(tiny_mlp, tmp_path):
    _, path = tiny_mlp
    loaded = load_checkpoint(path)
    compress_(loaded.model, find_targets(loaded.model), RankPolicy(rank=3))
    card = ModelCard.load(export(loaded.model, tmp_path / "t") / "README.md")
    assert card.data.library_name == "dlnc" and "model=MyModule()" in card.text

    compressed, _ = compressed_export("llama", tmp_path)
    merged = export(compressed, tmp_path / "m", config=compressed.config, format="dense")
    card = ModelCard.load(merged / "README.md")
    assert "merged" in card.data.tags and "import compressor" not in card.text
    facts = card_facts(compressed, "svd", format="dense", report=None)
    assert facts.params_after == facts.params_before


def test_base_model_is_only_a_hub_id(tmp_path):
    assert base_model_id(tmp_path / "models--org--name" / "snapshots" / "x", None) == "org/name"
    assert base_model_id(tmp_path / "plain", None) is None

    class Config:
        _name_or_path = "meta-llama/Llama-3.2-1B"

    assert base_model_id(None, Config()) == "meta-llama/Llama-3.2-1B"
    Config._name_or_path = str(tmp_path)
    assert base_model_id(None, Config()) is None


BASE_CARD = """---
license: apache-2.0
language:
- en
- fr
pipeline_tag: text-generation
datasets:
- acme/corpus
tags:
- chat
model-index:
- name: tiny
  results: []
---
# The base model
"""


def _cli(monkeypatch, *args):
    """Run `dlnc ARGS` as a user would (sys.argv is what the card records)."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(sys, "argv", ["dlnc", *args])
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def chain(tmp_path, monkeypatch):
    """A base folder with a card (in a Hub cache path), `dlnc compress` of it with held-out
    perplexity, then `dlnc finetune` of that export: the three folders and two commands."""
    from safetensors.torch import save_file

    base = tmp_path / "models--acme--tiny-gpt2" / "snapshots" / "abc123"
    build_tiny("gpt2").save_pretrained(base)
    (base / "README.md").write_text(BASE_CARD)
    data = tmp_path / "tokens.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(1, 64, (40, 16), generator=g)}, data)
    small, tuned = tmp_path / "small", tmp_path / "tuned"
    compress = ["compress", str(base), "--keep", "0.4", "--out", str(small), "--data", str(data)]
    finetune = ["finetune", str(small), "--data", str(data), "--teacher", str(base),
                "--steps", "2", "--out", str(tuned)]  # fmt: skip
    _cli(monkeypatch, *compress)
    _cli(monkeypatch, *finetune)
    return base, small, tuned, ["dlnc " + " ".join(compress), "dlnc " + " ".join(finetune)]


def test_the_base_cards_metadata_and_the_chain_reach_every_export(chain):
    from importlib.metadata import version

    _, small, tuned, commands = chain
    for folder, chained in ((small, commands[:1]), (tuned, commands)):
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == "apache-2.0" and card.data.language == ["en", "fr"]
        assert card.data.datasets == ["acme/corpus"] and card.data.pipeline_tag == "text-generation"
        assert {"chat", "dlnc", "low-rank"} <= set(card.data.tags)
        assert card.data.base_model == "acme/tiny-gpt2"
        assert card.data.base_model_relation == "quantized"
        assert "model-index" not in card.data.to_dict()  # the base's scores are not ours
        section = json.loads((folder / "config.json").read_text())["dlnc"]
        assert section["commands"] == chained and section["base_model"] == "acme/tiny-gpt2"
        block = card.text.split("```bash\n")[1].split("```")[0]
        assert block.splitlines() == chained
        assert f"with dlnc {version('dlnc')}" in card.text
    card = (tuned / "README.md").read_text()
    report = json.loads((tuned / "report.json").read_text())
    ppl, evals = report["perplexity"], report["finetune"]["eval"]
    assert f"| {ppl['before']:.2f} | {ppl['after']:.2f} |" in card  # compress's held-out numbers
    row = " | ".join(f"{evals[k]['perplexity']:.4g}" for k in ("original", "before", "after"))
    assert f"| perplexity | {row} |" in card  # and fine-tuning's
    assert f"held out: {evals['after']['samples']} samples" in card


def test_the_dlnc_version_is_in_config_report_and_weights(chain):
    from importlib.metadata import version

    from safetensors import safe_open

    _, small, tuned, _ = chain
    for folder in (small, tuned):
        assert json.loads((folder / "config.json").read_text())["dlnc"]["dlnc_version"] == (
            version("dlnc")
        )
        assert json.loads((folder / "report.json").read_text())["dlnc_version"] == version("dlnc")
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert f.metadata()["dlnc_version"] == version("dlnc")


def test_a_sentence_transformers_model_gets_its_snippet(tmp_path):
    compressed, out = compressed_export("bert", tmp_path)
    source = tmp_path / "bert-dense"
    (source / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]'
    )
    shutil.rmtree(out)
    out = export(compressed, out, config=compressed.config, source=source)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert "import compressor" in card.text
    assert 'model = SentenceTransformer("path/to/this/folder")' in card.text
    assert "BertModel" not in card.text


def test_each_head_loads_with_its_auto_class_and_no_base_card_adds_nothing(tmp_path):
    compressed, out = compressed_export("bert", tmp_path)  # BertForMaskedLM
    card = ModelCard.load(out / "README.md")
    assert "from transformers import AutoModelForMaskedLM\n" in card.text
    assert card.data.pipeline_tag == "fill-mask" and card.data.license is None
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    compressed.config.architectures = ["BertModel"]  # an encoder without a head
    facts = card_facts(compressed, "svd", format="factors", report=None)
    text = model_card(facts, config=compressed.config, source=None)
    assert "from transformers import AutoModel\n" in text and "feature-extraction" in text
