"""Every export writes a model card: Hub metadata, a compression table whose numbers match the
files (parameters and bytes before/after), the command and how to load it."""

from __future__ import annotations

import sys

import pytest
from conftest import build_tiny
from hf_helpers import compressed_export
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from compressor.core.compress import compress_
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import count_params
from compressor.core.targets import find_targets
from compressor.io.checkpoint import load_checkpoint
from compressor.io.export import export
from compressor.io.model_card import base_model_id, card_facts


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
    assert "GPT2LMHeadModel.from_pretrained" in card.text


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
