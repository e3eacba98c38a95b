"""Every shipped recipe end to end on a tiny model of its family, built from a config:
`--recipe auto` picks it, compress, a few fine-tuning steps with the recipe's settings,
export, reload with identical logits. The plain MLP goes through tensor mode (no forward of
its own, so no fine-tuning) with the generic recipe."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MLP, example_inputs, save_tiny
from torch import nn

from compressor.core.compress import compress_
from compressor.core.surgery import factorized_layers
from compressor.io.export import export
from compressor.io.load import load_pretrained
from compressor.recipes.choose import choose_recipe
from compressor.recipes.schema import recipe_names
from compressor.workflows.compress import compress_checkpoint
from compressor.workflows.options import compress_options, finetune_config

FAMILIES = {
    "gpt2": "gpt2", "bert": "bert", "llama": "llama", "vit": "vit", "t5": "t5",
    "phi3": "phi3", "gemma3": "gemma3", "mixtral": "moe",
}  # fmt: skip
"""Tiny family (`tiny_models.TINY_MODELS`) -> the recipe `--recipe auto` must pick for it."""


def train_batches(family: str, n: int = 3) -> list[dict[str, torch.Tensor]]:
    if family == "vit":
        g = torch.Generator().manual_seed(2)
        return [{"pixel_values": torch.randn(4, 3, 16, 16, generator=g)} for _ in range(n)]
    batches = [example_inputs(family, batch=4, seed=2 + i) for i in range(n)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    return batches


def finetune_steps(recipe, student: nn.Module, teacher: nn.Module, family: str) -> nn.Module:
    """Two optimizer steps with the recipe's fine-tuning settings, distilling from `teacher`."""
    from compressor.training.loop import finetune

    config = finetune_config(recipe, steps=2, warmup=0.0)
    return finetune(student, train_batches(family), teacher=teacher, config=config).model


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_every_shipped_family_recipe_has_an_end_to_end_case():
    assert set(recipe_names()) == set(FAMILIES.values()) | {"generic"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recipe_compress_finetune_export_reload(family, tmp_path):
    original, _ = save_tiny(family, tmp_path / "in")
    recipe, source = choose_recipe("auto", tmp_path / "in")
    assert (recipe.name, source.warning) == (FAMILIES[family], None)

    # 1) compress with the recipe's targets and ranks
    options = compress_options(recipe, source)
    result = compress_checkpoint(tmp_path / "in", tmp_path / "compressed", options)
    assert result.report["recipe"]["name"] == recipe.name
    factorized = [r["name"] for r in result.report["layers"] if r["rank"] is not None]
    assert factorized, "the recipe should factorize some layer of the tiny model"
    if family in ("llama", "gemma3", "mixtral"):  # GQA k/v projections are not targeted
        assert not [r for r in result.report["layers"] if r["name"].endswith(("k_proj", "v_proj"))]

    # 2) a few fine-tuning steps with the recipe's objective, lr, depth and outer lr
    student = load_pretrained(tmp_path / "compressed")
    assert sorted(factorized_layers(student)) == sorted(factorized)
    tuned = finetune_steps(recipe, student, original, family)
    assert {layer.depth for layer in factorized_layers(tuned).values()} == {recipe.chain.depth}

    # 3) export and reload: identical logits
    out = export(tuned, tmp_path / "tuned", config=original.config)
    reloaded = load_pretrained(out)
    assert {layer.depth for layer in factorized_layers(reloaded).values()} == {2}
    inputs = example_inputs(family)
    torch.testing.assert_close(
        logits(reloaded, inputs), logits(tuned, inputs), rtol=1e-4, atol=1e-5
    )


def test_generic_recipe_on_a_plain_mlp_in_tensor_mode(tiny_mlp, tmp_path):
    model, path = tiny_mlp
    recipe, source = choose_recipe("auto", path)
    assert (recipe.name, source.picked_by, source.warning) == (
        "generic",
        "auto (tensor mode)",
        None,
    )
    options = compress_options(recipe, source)
    result = compress_checkpoint(path, tmp_path / "out", options)
    assert result.report["tensor_mode"] and result.report["recipe"]["name"] == "generic"
    reloaded = load_pretrained(tmp_path / "out")
    assert factorized_layers(reloaded)
    rebuilt = MLP()  # the plain module with the reloaded (factorized) layers in place
    for name, _ in list(rebuilt.named_children()):
        setattr(rebuilt, name, reloaded.get_submodule(name))
    # the same compression in memory, on the plain module: identical outputs after reload
    in_memory = copy.deepcopy(model)
    targets = {
        n: m
        for n, m in in_memory.named_children()
        if n in {r["name"] for r in result.report["layers"]}
    }
    compress_(in_memory, targets, options.policy, options.depth)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), in_memory(x), rtol=1e-5, atol=1e-6)


def test_compress_finetune_steps_takes_the_recipes_finetune_section(tmp_path):
    """`dlnc compress --finetune-steps` trains with the recipe's objective and settings."""
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from cli.main import app

    save_tiny("gpt2", tmp_path / "in")
    tokens = tmp_path / "tokens.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(1, 64, (24, 12), generator=g)}, tokens)
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "name: mine\ntargets: {include: [c_fc]}\nranks: {keep: 0.4}\n"
        "chain: {depth: 3, outer_lr_scale: 2.0}\n"
        "finetune: {objective: mix, lr: 3.0e-4, steps: 50, batch_size: 4, max_length: 12}\n"
    )
    args = ["compress", tmp_path / "in", "--recipe", mine, "--out", tmp_path / "out",
            "--finetune-steps", 2, "--finetune-data", tokens, "--json"]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["finetune"]["objective"].startswith("mix") and report["finetune"]["steps"] == 2
    values = report["recipe"]["values"]
    assert values["finetune"]["steps"] == 2 and values["finetune"]["lr"] == 3e-4  # flag won
    assert {r["name"].rsplit(".", 1)[-1] for r in report["layers"]} == {"c_fc"}
    load_pretrained(tmp_path / "out")


def test_t5_wo_stays_dense_even_when_asked_for(tmp_path):
    """T5's feed-forward reads `self.wo.weight`; compressing it would break the model, so it
    is skipped with a notice even under the generic recipe (every Linear)."""
    original, _ = save_tiny("t5", tmp_path / "in")
    recipe, source = choose_recipe("generic", tmp_path / "in")
    result = compress_checkpoint(
        tmp_path / "in", tmp_path / "out", compress_options(recipe, source)
    )
    compressed = {r["name"] for r in result.report["layers"]}
    assert compressed and not any(n.endswith(".wo") for n in compressed)
    assert any(".wo stays dense" in n for n in result.notices)
    reloaded = load_pretrained(tmp_path / "out")
    inputs = example_inputs("t5")
    assert logits(reloaded, inputs).shape == logits(original, inputs).shape


@pytest.mark.parametrize(("family", "kv_targeted"), [("llama-mha", True), ("llama", False)])
def test_llama_recipe_targets_k_and_v_only_where_square(family, kv_targeted, tmp_path):
    # 4 of 4 heads: no GQA, k_proj/v_proj are 32x32 and compressed like q_proj; 2 of 4: GQA,
    # they are 16x32 and stay dense with a notice naming the reason
    save_tiny(family, tmp_path / "in")
    recipe, source = choose_recipe("auto", tmp_path / "in")
    options = compress_options(recipe, source)
    result = compress_checkpoint(tmp_path / "in", tmp_path / "out", options)
    names = {r["name"].rsplit(".", 1)[-1] for r in result.report["layers"]}
    assert {"k_proj", "v_proj"} <= names if kv_targeted else not {"k_proj", "v_proj"} & names
    narrow = [n for n in result.notices if "not square" in n]
    assert len(narrow) == (0 if kv_targeted else 2)
    if not kv_targeted:
        assert narrow[0].startswith("k_proj: 2 layer(s) stay dense: 16x32 is not square")
