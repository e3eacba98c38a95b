"""Disk -> disk workflows: compress_checkpoint, estimate_checkpoint and the option assembly,
checked on tiny checkpoints of every shipped recipe's family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MLP, build_tiny, example_inputs

from compressor.core.surgery import factorized_layers
from compressor.errors import DlncError
from compressor.io.export import load_pretrained
from compressor.io.rankfile import save_ranks
from compressor.recipes.schema import apply_overrides, choose_recipe, load_recipe, recipe_names
from compressor.workflows.compress import CompressOptions, compress_checkpoint
from compressor.workflows.estimate import estimate_checkpoint
from compressor.workflows.options import apply_ranks_file, compress_options, method_options

RECIPE_MODELS = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "vit": "vit", "t5": "t5"}


def _checkpoint(tmp_path, recipe: str):
    """A tiny checkpoint served by `recipe` (the generic recipe: a bare MLP in tensor mode)."""
    if recipe == "generic":
        from safetensors.torch import save_file

        torch.manual_seed(0)
        path = tmp_path / "mlp" / "model.safetensors"
        path.parent.mkdir()
        save_file(MLP().state_dict(), path)
        return path
    folder = tmp_path / recipe
    build_tiny(RECIPE_MODELS[recipe]).save_pretrained(folder)
    return folder


def test_every_shipped_recipe_has_a_case_here():
    assert set(recipe_names()) == {*RECIPE_MODELS, "generic"}


@pytest.mark.parametrize("recipe_name", sorted({*RECIPE_MODELS, "generic"}))
def test_estimate_save_then_compress_with_those_ranks_round_trips(tmp_path, recipe_name):
    """The ranks `estimate_checkpoint` chooses, saved and given back to `compress`, are the
    ranks `compress` uses: both select targets through the same recipe."""
    path = _checkpoint(tmp_path, recipe_name)
    recipe, source = choose_recipe("auto", path)
    assert recipe.name == recipe_name
    recipe = apply_overrides(recipe, {"ranks.keep": 0.3})
    estimate = estimate_checkpoint(path, compress_options(recipe, source))
    saved = save_ranks(tmp_path / "ranks.yaml", estimate.chosen, method=estimate.method)
    options = apply_ranks_file(compress_options(recipe, source), saved)
    result = compress_checkpoint(path, tmp_path / "out", options)
    used = {r["name"]: r["rank"] for r in result.report["layers"]}
    expected = {n: r for n, r in estimate.chosen.items() if r is not None}
    assert {n: r for n, r in used.items() if r is not None} == expected


def test_compress_checkpoint_writes_a_report_whose_totals_add_up(tmp_path):
    build_tiny("bert").save_pretrained(tmp_path / "bert")
    options = CompressOptions()
    result = compress_checkpoint(tmp_path / "bert", tmp_path / "out", options)
    report = json.loads((result.out_dir / "report.json").read_text())
    layers = report["layers"]
    assert report["targeted_params_before"] == sum(r["params_before"] for r in layers)
    assert report["targeted_params_after"] == sum(r["params_after"] for r in layers)
    assert report["targeted_keep"] <= 0.5
    saved = report["targeted_params_before"] - report["targeted_params_after"]
    assert report["model_params_after"] == report["model_params_before"] - saved
    assert report["bytes_after"] < report["bytes_before"]


def test_compress_checkpoint_matches_the_in_memory_compression(tmp_path):
    model = build_tiny("gpt2")
    model.save_pretrained(tmp_path / "g")
    result = compress_checkpoint(tmp_path / "g", tmp_path / "out", CompressOptions())
    reloaded = load_pretrained(result.out_dir)
    assert set(factorized_layers(reloaded)) == {
        r["name"] for r in result.report["layers"] if r["rank"] is not None
    }
    inputs = example_inputs("gpt2")
    with torch.no_grad():
        assert not torch.allclose(reloaded(**inputs).logits, model(**inputs).logits)


def test_whiten_without_data_is_refused_before_any_work(tmp_path):
    with pytest.raises(DlncError, match="`method` whiten needs calibration data"):
        method_options(load_recipe("bert"), "whiten")


def test_a_typo_in_include_names_where_it_came_from(tmp_path):
    build_tiny("bert").save_pretrained(tmp_path / "bert")
    recipe = load_recipe("bert")
    given = apply_overrides(recipe, {"targets.include": ["nonexistent"]})
    options = compress_options(given, from_flags=["targets.include"])
    with pytest.raises(DlncError, match="`include`: 'nonexistent' matches no module"):
        compress_checkpoint(tmp_path / "bert", tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
    options = compress_options(given)
    with pytest.raises(DlncError, match=r"recipe bert: targets\.include: 'nonexistent'"):
        compress_checkpoint(tmp_path / "bert", tmp_path / "out", options)
