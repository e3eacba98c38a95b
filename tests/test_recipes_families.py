"""The causal-LM families people compress today, each on a tiny model built from its config
(`tiny_models.TINY_MODELS`) and saved like a user's checkpoint: `--recipe auto` picks the
expected recipe without a warning, compression targets the expected layers, and the export
reloads with the logits of the same compression done in memory. A family no recipe claims
gets the recipe whose target names match its layers (structure), and generic with the
warning only when none does."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_tiny, example_inputs, save_tiny
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from compressor.core.compress import compress_
from compressor.core.surgery import factorized_layers
from compressor.io.checkpoint import load_checkpoint
from compressor.io.load import load_pretrained
from compressor.recipes.choose import choose_recipe, claimed, select_recipe
from compressor.recipes.schema import load_recipe
from compressor.recipes.structure import best_fit, fits, skeleton
from compressor.workflows.compress import compress_checkpoint
from compressor.workflows.options import compress_options
from compressor.workflows.targets import expand_overrides, select_targets

LLAMA = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
"""Under grouped-query attention (every tiny decoder here: 2 key/value heads for 4 query
heads) k_proj and v_proj are narrow and stay dense (`square_only`)."""
SHARED = tuple(p.replace("mlp.", "mlp.shared_expert.") for p in LLAMA[2:])

FAMILIES = {
    # tiny family: (config.json model_type, recipe, targeted layers of each decoder layer)
    "llama3": ("llama", "llama", LLAMA),  # rope_scaling llama3
    "mistral": ("mistral", "llama", LLAMA),
    "qwen2": ("qwen2", "llama", LLAMA),
    "qwen3": ("qwen3", "llama", LLAMA),  # q_norm, k_norm; head_dim apart from hidden/heads
    "gemma": ("gemma", "llama", LLAMA),
    "gemma2": ("gemma2", "llama", LLAMA),
    "gemma3-text": ("gemma3_text", "llama", LLAMA),
    "gemma3": ("gemma3", "gemma3", LLAMA),  # the language model only, no vision tower
    "phi3": ("phi3", "phi3", ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                              "mlp.down_proj")),
    "qwen2-moe": ("qwen2_moe", "llama", (*LLAMA[:2], *SHARED)),  # routed experts are 3-D
    "qwen3-moe": ("qwen3_moe", "moe", LLAMA[:2]),
    "mixtral": ("mixtral", "moe", LLAMA[:2]),
}  # fmt: skip


def decoder_layers(model: nn.Module) -> str:
    """The dotted path of the decoder's layer list (`model.layers`, or the language model's
    in a vision-language model)."""
    paths = [n for n, m in model.named_modules() if n.endswith("layers") and "vision" not in n]
    return paths[0]


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_every_family_of_the_issue_is_covered_and_every_model_type_is_claimed():
    assert {"llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3-text", "phi3"} <= set(FAMILIES)
    for family, (model_type, name, _) in FAMILIES.items():
        assert build_tiny(family).config.model_type == model_type
        assert claimed(model_type) and model_type in load_recipe(name).model_types


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_compresses_with_its_recipe_and_reloads_as_in_memory(family, tmp_path):
    model_type, name, per_layer = FAMILIES[family]
    _, path = save_tiny(family, tmp_path / "in")
    recipe, source = choose_recipe("auto", path)
    assert (recipe.name, source.picked_by, source.warning) == (
        name, f"auto (model_type {model_type})", None,
    )  # fmt: skip

    options = compress_options(recipe, source)
    result = compress_checkpoint(path, tmp_path / "out", options)
    original = build_tiny(family)
    prefix = decoder_layers(original)
    count = original.config.get_text_config().num_hidden_layers
    expected = {f"{prefix}.{i}.{p}" for i in range(count) for p in per_layer}
    assert {r["name"] for r in result.report["layers"]} == expected
    ranks = {r["name"]: r["rank"] for r in result.report["layers"] if r["rank"] is not None}
    assert ranks, "the recipe should factorize some layer of the tiny model"

    # the same compression in memory: same ranks, and the export reloads to the same logits
    loaded = load_checkpoint(path)
    targets = select_targets(loaded, options)
    compress_(loaded.model, targets, expand_overrides(options.policy, list(targets)), options.depth)
    in_memory = loaded.model
    assert {n: layer.rank for n, layer in factorized_layers(in_memory).items()} == ranks
    reloaded = load_pretrained(tmp_path / "out")
    assert {n: layer.rank for n, layer in factorized_layers(reloaded).items()} == ranks
    inputs = example_inputs(family)
    torch.testing.assert_close(
        logits(reloaded, inputs), logits(in_memory, inputs), rtol=1e-4, atol=1e-5
    )
    assert not torch.allclose(logits(reloaded, inputs), logits(original, inputs))


def test_gemma3_leaves_the_vision_tower_and_projector_dense(tmp_path):
    _, path = save_tiny("gemma3", tmp_path / "in")
    recipe, source = choose_recipe("auto", path)
    result = compress_checkpoint(path, tmp_path / "out", compress_options(recipe, source))
    names = [r["name"] for r in result.report["layers"]]
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    # the llama recipe's plain names would also have caught the tower's q/k/v projections
    tower = [n for n, _ in build_tiny("gemma3").named_modules() if n.endswith("q_proj")]
    assert any("vision_tower" in n for n in tower)


# ---- chosen by structure ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "model_type", "name"),
    [("olmo2", "olmo2", "llama"), ("gpt-bigcode", "gpt_bigcode", "gpt2")],
)
def test_a_family_without_a_recipe_gets_the_one_its_layer_names_match(
    family, model_type, name, tmp_path
):
    assert not claimed(model_type)
    _, path = save_tiny(family, tmp_path / "in")
    result = CliRunner().invoke(app, ["compress", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert f"recipe: {name} (auto (model_type {model_type}, by its layer names): " in (
        result.output
    )
    assert "warning" not in result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["recipe"]["name"], report["recipe"]["warning"]) == (name, None)
    leaves = {r["name"].rsplit(".", 1)[-1] for r in report["layers"]}
    recipe = load_recipe(name)
    assert leaves <= set(recipe.targets.include) and len(leaves) >= 3
    load_pretrained(tmp_path / "o")


def test_structure_needs_the_names_to_match_both_ways(tmp_path):
    """A recipe fits when each of its names is a layer of the model and every dense layer
    of the model (heads aside) is one of its targets."""
    llama, gpt2, phi3, moe = (load_recipe(n) for n in ("llama", "gpt2", "phi3", "moe"))

    def fit(recipe, model):
        return fits(model, recipe.targets.include, recipe.targets.exclude)

    olmo2, mixtral, phi = build_tiny("olmo2"), build_tiny("mixtral"), build_tiny("phi3")
    assert fit(llama, olmo2) and not fit(moe, olmo2)  # moe would leave the MLP dense
    assert fit(moe, mixtral) and not fit(llama, mixtral)  # no gate/up/down_proj layers
    assert fit(phi3, phi) and not fit(llama, phi)  # qkv_proj is not q_proj
    assert not fit(gpt2, olmo2) and not fit(load_recipe("generic"), olmo2)
    bigcode = build_tiny("gpt-bigcode")
    assert fit(gpt2, bigcode)
    candidates = [(r.name, r.targets.include, r.targets.exclude) for r in (moe, llama, gpt2)]
    assert best_fit(olmo2, candidates) == "llama" and best_fit(build_tiny("t5"), candidates) is None

    # an extra dense layer no recipe names: nothing fits, generic with the warning
    olmo2.model.layers[0].mlp.extra = nn.Linear(32, 32)
    assert not fit(llama, olmo2)
    recipe, warning = select_recipe("olmo2", olmo2)
    assert recipe.name == "generic" and "no recipe's layer names match" in warning


def test_the_skeleton_is_built_without_reading_weights(tmp_path):
    _, path = save_tiny("olmo2", tmp_path / "in")
    model = skeleton(path)
    assert model is not None and all(p.is_meta for p in model.parameters())
    assert skeleton(tmp_path / "nowhere") is None
    (tmp_path / "in" / "config.json").write_text('{"model_type": "no_such_family"}')
    assert skeleton(path) is None  # transformers cannot build it: loading will say why
    recipe, source = choose_recipe("auto", path)
    assert recipe.name == "generic" and "'no_such_family'" in source.warning


def test_a_claimed_family_never_builds_a_skeleton(tmp_path, monkeypatch):
    import compressor.recipes.choose as choose

    _, path = save_tiny("llama3", tmp_path / "in")
    monkeypatch.setattr(choose, "skeleton", lambda *a, **k: pytest.fail("built a skeleton"))
    assert choose_recipe("auto", path)[0].name == "llama"
