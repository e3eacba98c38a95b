"""Disk -> disk workflows: compress_checkpoint, estimate_checkpoint and the option assembly,
checked on tiny checkpoints of every shipped recipe's family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import example_inputs, save_tiny

from compressor.core.surgery import factorized_layers
from compressor.errors import DlncError
from compressor.io.load import load_pretrained
from compressor.io.rankfile import save_ranks
from compressor.options import CompressOptions, ExportOptions, RunOptions
from compressor.recipes.choose import choose_recipe
from compressor.recipes.schema import apply_overrides, load_recipe, recipe_names
from compressor.workflows.compress import compress_checkpoint
from compressor.workflows.estimate import estimate_checkpoint
from compressor.workflows.options import apply_ranks_file, compress_options, method_options

RECIPE_MODELS = {
    "bert": "bert", "gpt2": "gpt2", "llama": "llama", "vit": "vit", "t5": "t5", "generic": "mlp",
    "phi3": "phi3", "gemma3": "gemma3", "moe": "mixtral",
}  # fmt: skip
"""Each shipped recipe -> the tiny family (`tiny_models.TINY_MODELS`) it is checked on; the
generic recipe on a bare MLP in tensor mode."""


def _checkpoint(tmp_path, recipe: str):
    """The path of a tiny checkpoint served by `recipe`."""
    family = RECIPE_MODELS[recipe]
    return save_tiny(family, tmp_path / family)[1]


def test_every_shipped_recipe_has_a_case_here():
    assert set(recipe_names()) == set(RECIPE_MODELS)


@pytest.mark.parametrize("recipe_name", sorted(RECIPE_MODELS))
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
    save_tiny("bert", tmp_path / "bert")
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


def _tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_the_streamed_export_matches_the_in_memory_compression(tmp_path):
    """With the exact solver, streaming (one tensor at a time) writes the very tensors the
    in-memory path writes, so the two exports reload to models with identical logits."""
    _, folder = save_tiny("gpt2", tmp_path / "g")
    exports = {
        stream: compress_checkpoint(
            folder,
            tmp_path / f"stream-{stream}",
            CompressOptions(run=RunOptions(stream=stream, solver="exact")),
        )
        for stream in (False, True)
    }
    in_memory, streamed = exports[False], exports[True]
    ranks = {r["name"]: r["rank"] for r in in_memory.report["layers"]}
    assert ranks == {r["name"]: r["rank"] for r in streamed.report["layers"]}
    assert any(rank is not None for rank in ranks.values())
    expected, written = _tensors(in_memory.out_dir), _tensors(streamed.out_dir)
    assert expected.keys() == written.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name

    reloaded = {stream: load_pretrained(r.out_dir) for stream, r in exports.items()}
    assert set(factorized_layers(reloaded[True])) == {n for n, r in ranks.items() if r is not None}
    inputs = example_inputs("gpt2")
    with torch.no_grad():
        logits = {stream: model(**inputs).logits for stream, model in reloaded.items()}
    assert torch.equal(logits[True], logits[False])


def test_whiten_without_data_is_refused_before_any_work(tmp_path):
    with pytest.raises(DlncError, match="`method` whiten needs calibration data"):
        method_options(load_recipe("bert"), "whiten")


def test_a_typo_in_include_names_where_it_came_from(tmp_path):
    save_tiny("bert", tmp_path / "bert")
    recipe = load_recipe("bert")
    given = apply_overrides(recipe, {"targets.include": ["nonexistent"]})
    options = compress_options(given, from_flags=["targets.include"])
    with pytest.raises(DlncError, match="`include`: 'nonexistent' matches no module"):
        compress_checkpoint(tmp_path / "bert", tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
    options = compress_options(given)
    with pytest.raises(DlncError, match=r"recipe bert: targets\.include: 'nonexistent'"):
        compress_checkpoint(tmp_path / "bert", tmp_path / "out", options)


def test_max_shard_size_is_checked_by_the_options():
    with pytest.raises(DlncError, match="max_shard_size"):
        ExportOptions(max_shard_size="banana")
    ExportOptions(max_shard_size="500MB")
