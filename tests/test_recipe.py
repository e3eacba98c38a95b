"""Recipes: every shipped one loads, round-trips and serves the model types it claims; every
validation error names its key or pattern; command-line flags win over recipe values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny
from typer.testing import CliRunner

from cli.flags import RECIPE_FLAGS as FLAG_NAMES
from cli.main import app
from compressor.errors import DlncError
from compressor.io.checkpoint import LoadedCheckpoint
from compressor.methods import names as method_names
from compressor.recipes.choose import select_recipe
from compressor.recipes.schema import (
    GENERIC,
    Recipe,
    _Loader,
    apply_overrides,
    find_recipe,
    load_recipe,
    parse_recipe,
    recipe_names,
    recipe_to_yaml,
    recipes_dir,
)
from compressor.training.objectives import check_params, objective_names
from compressor.workflows.compress import select_targets
from compressor.workflows.options import (
    compress_options,
    data_options,
    finetune_config,
    rank_method,
)

runner = CliRunner()
SHIPPED = recipe_names()


def dlnc(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_issue_families_ship():
    assert {"bert", "gpt2", "llama", "vit", "t5", GENERIC} <= set(SHIPPED)
    assert recipes_dir() == Path(__file__).resolve().parent.parent / "recipes"


def test_the_package_data_copy_is_the_same_files():
    """An installed (non-editable) dlnc reads compressor/recipes/shipped, a link to recipes/."""
    import compressor

    packaged = Path(compressor.__file__).parent / "recipes" / "shipped"
    assert sorted(p.name for p in packaged.glob("*.yaml")) == [f"{n}.yaml" for n in SHIPPED]
    assert all((packaged / f"{n}.yaml").read_text() == find_recipe(n).read_text() for n in SHIPPED)


# ---- every shipped recipe --------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads_and_round_trips_unchanged(name):
    path = find_recipe(name)
    recipe = load_recipe(name)
    assert recipe.name == path.stem == name
    raw = yaml.load(path.read_text(), Loader=_Loader)
    assert recipe.model_dump(mode="json", exclude_unset=True) == raw  # nothing lost or coerced
    text = recipe_to_yaml(recipe)
    assert parse_recipe(text) == recipe
    assert recipe_to_yaml(parse_recipe(text)) == text


def test_no_two_recipes_claim_a_model_type():
    claims = [t for name in SHIPPED for t in load_recipe(name).model_types]
    assert len(claims) == len(set(claims))
    assert load_recipe(GENERIC).model_types == []


def test_schema_choices_match_the_library():
    """The recipe accepts exactly the registered rank methods (and auto) and objectives."""
    for method in ("auto", *method_names()):
        assert parse_recipe(f"ranks: {{method: {method}, keep: 0.5}}").ranks.method == method
    with pytest.raises(DlncError, match=r"ranks\.method"):
        parse_recipe("ranks: {method: nonsense, keep: 0.5}")
    for objective in objective_names():
        assert parse_recipe(f"finetune: {{objective: {objective}}}").finetune.objective == objective


@pytest.mark.parametrize(
    ("recipe_method", "flag", "expected"),
    [("auto", None, None), ("whiten", None, "whiten"), ("whiten", "svd", "svd"),
     ("auto", "dynamics", "dynamics")],
)  # fmt: skip
def test_rank_method_flag_wins_and_auto_leaves_the_choice_to_the_data_options(
    recipe_method, flag, expected
):
    recipe = parse_recipe(f"ranks: {{method: {recipe_method}, keep: 0.5}}")
    assert rank_method(recipe, flag) == (expected or "auto")


SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 32}  # fmt: skip
MOE = {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16}  # fmt: skip
SEQ2SEQ = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4, "vocab_size": 64}
TINY_CONFIGS = {
    "bert": SMALL, "roberta": SMALL, "xlm-roberta": SMALL, "camembert": SMALL,
    "electra": {**SMALL, "embedding_size": 32},
    "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 64, "n_positions": 32},
    "llama": {**SMALL, "num_key_value_heads": 2}, "mistral": {**SMALL, "num_key_value_heads": 2},
    "qwen2": {**SMALL, "num_key_value_heads": 2},
    "qwen3": {**SMALL, "num_key_value_heads": 2, "head_dim": 8},
    "gemma": {**SMALL, "num_key_value_heads": 2, "head_dim": 8},
    "gemma2": {**SMALL, "num_key_value_heads": 2, "head_dim": 8},
    "gemma3_text": {**SMALL, "num_key_value_heads": 2, "head_dim": 8},
    "gemma3": {"text_config": {**SMALL, "num_key_value_heads": 2, "head_dim": 8},
               "vision_config": {**SMALL, "image_size": 16, "patch_size": 4}},
    "phi3": {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0},
    "qwen2_moe": {**SMALL, **MOE, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {**SMALL, **MOE, "head_dim": 8},
    "mixtral": {**SMALL, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "vit": {**SMALL, "image_size": 16, "patch_size": 8, "vocab_size": None},
    "deit": {**SMALL, "image_size": 16, "patch_size": 8, "vocab_size": None},
    "t5": SEQ2SEQ, "mt5": SEQ2SEQ,
}  # fmt: skip
CLAIMED = sorted((t, n) for n in SHIPPED for t in load_recipe(n).model_types)


def tiny_base_model(model_type: str):
    import transformers

    kwargs = {k: v for k, v in TINY_CONFIGS[model_type].items() if v is not None}
    if "vocab_size" in TINY_CONFIGS[model_type] and kwargs.get("vocab_size") is None:
        kwargs.pop("max_position_embeddings", None)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    return transformers.AutoModel.from_config(config)


def test_every_claimed_model_type_has_a_tiny_config():
    assert {t for t, _ in CLAIMED} == set(TINY_CONFIGS)


@pytest.mark.parametrize(("model_type", "name"), CLAIMED)
def test_auto_picks_the_recipe_and_its_patterns_fit_the_architecture(model_type, name):
    recipe, warning = select_recipe(model_type)
    assert (recipe.name, warning) == (name, None)
    model = tiny_base_model(model_type)
    loaded = LoadedCheckpoint(model, Path("."), [], config=model.config)
    targets = select_targets(loaded, compress_options(recipe))  # every pattern must match
    assert targets
    leaves = {n.rsplit(".", 1)[-1] for n in targets}
    if name in LEAVES:  # grouped-query k/v stay dense
        assert leaves == LEAVES[name]
    if name == "gemma3":  # the language model only
        assert all(".language_model." in f".{n}" for n in targets)


LEAVES = {
    "llama": {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma3": {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "moe": {"q_proj", "o_proj"},
}
"""The layers each decoder recipe targets in the tiny models (grouped-query attention)."""


def test_unknown_family_falls_back_to_generic_with_a_warning():
    recipe, warning = select_recipe("opt")
    assert recipe.name == GENERIC
    assert "no recipe for model_type 'opt'" in warning and "generic" in warning
    assert select_recipe(None) == (load_recipe(GENERIC), None)  # tensor mode: no warning


# ---- validation errors -------------------------------------------------------------------

BAD_RECIPES = {
    "unknown-top-key": ("name: x\nrankz: {keep: 0.5}\n", "rankz: unknown key (allowed: name,"),
    "unknown-nested-key": ("ranks: {kep: 0.5}\n", "ranks.kep: unknown key (allowed: method, keep"),
    "wrong-type-number": ("ranks: {keep: half}\n", "ranks.keep: Input should be a valid number"),
    "quoted-number": ("finetune: {steps: '100'}\n", "finetune.steps: Input should be a valid int"),
    "float-depth": ("chain: {depth: 3.0}\n", "chain.depth: Input should be a valid integer"),
    "list-expected": ("targets: {include: q}\n", "targets.include: Input should be a valid list"),
    "bad-method": ("ranks: {method: pca, keep: 0.5}\n", "ranks.method: Input should be 'auto'"),
    "two-budgets": ("ranks: {keep: 0.5, rank: 4}\n", "ranks: give exactly one of keep, energy"),
    "no-budget": ("ranks: {multiple: 8}\n", "ranks: give exactly one of keep, energy, rank"),
    "keep-range": ("ranks: {keep: 1.5}\n", "ranks.keep: `keep` must be in (0, 1), got 1.5"),
    "depth-range": ("chain: {depth: 1}\n", "chain.depth: `depth` must be >= 2, got 1"),
    "override-range": ("ranks: {keep: 0.5, overrides: {q_proj: 0}}\n", "ranks.overrides.q_proj"),
    "bad-regex": ("targets: {exclude: ['re:(']}\n", "targets.exclude: bad regex 're:('"),
    "bad-objective": ("finetune: {objective: mse}\n", "finetune.objective: Input should be"),
    "not-a-mapping": ("- a\n- b\n", "expected a mapping"),
    "bad-yaml": ("ranks: {keep: 0.5\n", "not valid YAML (line"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(BAD_RECIPES))
def test_a_bad_recipe_is_one_error_naming_the_file_and_key(kind, tmp_path):
    text, message = BAD_RECIPES[kind]
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(DlncError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"recipe {path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_exponent_floats_read_as_numbers():
    assert parse_recipe("finetune: {lr: 1e-4}").finetune.lr == pytest.approx(1e-4)


def test_an_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(DlncError, match=r"no recipe named 'lama'; shipped: bert, "):
        load_recipe("lama")
    with pytest.raises(DlncError, match="no such file"):
        load_recipe("missing/mine.yaml")


def _gpt2_folder(tmp_path):
    model = build_tiny("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


PATTERN_ERRORS = {
    "include": ("targets: {include: ['re:no_such_layer']}", "recipe mine: targets.include: "
                "'re:no_such_layer' matches no module of this model"),
    "exclude": ("targets: {exclude: [q_proj]}", "recipe mine: targets.exclude: 'q_proj' matches"),
    "override": ("ranks: {keep: 0.5, overrides: {wte: 4}}",
                 "recipe mine: ranks.overrides: 'wte' matches no targeted layer"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(PATTERN_ERRORS))
def test_a_pattern_that_matches_nothing_is_named_and_nothing_is_written(kind, tmp_path):
    text, message = PATTERN_ERRORS[kind]
    (tmp_path / "mine.yaml").write_text(f"name: mine\n{text}\n")
    folder = _gpt2_folder(tmp_path)
    result = dlnc("compress", folder, "--recipe", tmp_path / "mine.yaml", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_flag_pattern_that_matches_nothing_names_the_flag(tmp_path):
    folder = _gpt2_folder(tmp_path)
    result = dlnc("compress", folder, "--exclude", "c_atn", "--out", tmp_path / "o")
    assert result.exit_code == 1
    assert "error: --exclude: 'c_atn' matches no module of this model" in result.stderr


# ---- precedence: flags > recipe > built-in defaults ---------------------------------------

PRECEDENCE = [
    # (recipe, flags, expected (keep, energy, rank, multiple, depth, include))
    ("gpt2", {}, (0.5, None, None, 1, 3, ["c_attn", "c_proj", "c_fc"])),
    ("gpt2", {"ranks.energy": 0.9}, (None, 0.9, None, 1, 3, ["c_attn", "c_proj", "c_fc"])),
    ("gpt2", {"ranks.keep": 0.3, "chain.depth": 4}, (0.3, None, None, 1, 4, None)),
    ("gpt2", {"targets.include": ["c_fc"]}, (0.5, None, None, 1, 3, ["c_fc"])),
    ("llama", {}, (0.7, None, None, 8, 3, None)),
    ("llama", {"ranks.rank": 4}, (None, None, 4, 1, 3, None)),  # an explicit rank is exact
    ("llama", {"ranks.rank": 4, "ranks.multiple": 8}, (None, None, 4, 8, 3, None)),
    ("llama", {"ranks.multiple": 16}, (0.7, None, None, 16, 3, None)),
    ("llama", {"ranks.keep": None, "chain.depth": None}, (0.7, None, None, 8, 3, None)),
]


@pytest.mark.parametrize(("name", "flags", "expected"), PRECEDENCE)
def test_given_flags_override_recipe_values(name, flags, expected):
    recipe = apply_overrides(load_recipe(name), flags, FLAG_NAMES)
    given = [k for k, v in flags.items() if v is not None]
    options = compress_options(recipe, from_flags=given, flags=FLAG_NAMES)
    p = options.policy
    keep, energy, rank, multiple, depth, include = expected
    assert (p.keep, p.energy, p.rank, p.multiple, options.depth) == (
        keep, energy, rank, multiple, depth,
    )  # fmt: skip
    if include is not None:
        assert options.targets.include == include
    origin = options.targets.origins["include"]
    assert origin == (
        "--include" if "targets.include" in flags else f"recipe {name}: targets.include"
    )


def test_recipe_values_override_built_in_defaults(tmp_path):
    (tmp_path / "mine.yaml").write_text("chain: {depth: 5}\nfinetune: {lr: 3.0e-5}\n")
    recipe = load_recipe(tmp_path / "mine.yaml")
    defaults = Recipe(name="mine")
    assert recipe.name == "mine"  # from the file name
    assert (recipe.chain.depth, recipe.finetune.lr) == (5, 3e-5)
    assert recipe.ranks == defaults.ranks and recipe.ranks.keep == 0.5
    assert recipe.finetune.steps == defaults.finetune.steps


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ranks.keep": 1.5}, "--keep: `keep` must be in (0, 1), got 1.5"),
        ({"chain.depth": 1}, "--depth: `depth` must be >= 2, got 1"),
        ({"finetune.steps": 0}, "--finetune-steps: `steps` must be >= 1, got 0"),
        ({"targets.exclude": ["re:("]}, "--exclude: bad regex"),
    ],
)
def test_a_bad_flag_value_names_the_flag(flags, message):
    with pytest.raises(DlncError) as info:
        apply_overrides(load_recipe("gpt2"), flags, FLAG_NAMES)
    assert str(info.value).startswith(message)
    assert set(FLAG_NAMES) >= set(flags)


def test_cli_flags_win_and_the_report_records_the_effective_recipe(tmp_path):
    folder = _gpt2_folder(tmp_path)
    args = ("compress", folder, "--keep", 0.3, "--depth", 4, "--include", "c_fc", "--json")
    result = dlnc(*args, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["policy"]["keep"] == 0.3 and report["depth"] == 4
    assert {r["name"].rsplit(".", 1)[-1] for r in report["layers"]} == {"c_fc"}
    recipe = report["recipe"]
    assert (recipe["name"], recipe["picked_by"], recipe["warning"]) == (
        "gpt2", "auto (model_type gpt2)", None,
    )  # fmt: skip
    assert recipe["values"]["ranks"]["keep"] == 0.3 and recipe["values"]["chain"]["depth"] == 4
    assert recipe["values"]["targets"]["include"] == ["c_fc"]
    assert Path(recipe["path"]) == find_recipe("gpt2")


def test_a_users_yaml_file_works_like_a_shipped_recipe(tmp_path):
    folder = _gpt2_folder(tmp_path)
    mine = tmp_path / "attention-only.yaml"
    mine.write_text("name: attention-only\ntargets: {include: [c_attn]}\nranks: {rank: 4}\n")
    result = dlnc("compress", folder, "--recipe", mine, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert f"recipe: attention-only (--recipe: {mine})\n" in result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {r["name"].rsplit(".", 1)[-1] for r in report["layers"]} == {"c_attn"}


def test_an_unknown_family_compresses_with_the_generic_recipe_and_says_so(tmp_path):
    import transformers as tf

    config = tf.DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=1, n_heads=2, vocab_size=64, max_position_embeddings=32
    )
    tf.DistilBertForMaskedLM(config).save_pretrained(tmp_path / "distil")
    result = dlnc("compress", tmp_path / "distil", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "warning: no recipe for model_type 'distilbert'" in result.output
    assert "pass --recipe to choose another" in result.output  # the flag, not the parameter
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["recipe"]["name"] == GENERIC and "distilbert" in report["recipe"]["warning"]
    names = {r["name"] for r in report["layers"]}
    assert "vocab_projector" not in names and any(n.endswith("ffn.lin1") for n in names)
    # estimate-ranks picks its recipe the same way, and said nothing when it fell back
    result = dlnc("estimate-ranks", tmp_path / "distil")
    assert result.exit_code == 0, result.output
    assert "warning: no recipe for model_type 'distilbert'" in result.output
    assert "pass --recipe to choose another" in result.output


# ---- what the other parts of dlnc take from a recipe ---------------------------------------


def test_finetune_section_maps_onto_the_training_and_data_configs(tmp_path):
    recipe = load_recipe("llama")
    config = finetune_config(recipe, seed=3)
    f = recipe.finetune
    assert (config.steps, config.lr, config.objective, config.seed) == (f.steps, f.lr, "distill", 3)
    assert (config.depth, config.outer_lr_scale) == (
        recipe.chain.depth,
        recipe.chain.outer_lr_scale,
    )
    data = data_options(recipe, tmp_path / "train.jsonl")
    assert (data.batch_size, data.max_length) == (f.batch_size, f.max_length)
    images = data_options(load_recipe("vit"), tmp_path / "pixels.safetensors")
    assert images.batch_size == load_recipe("vit").finetune.batch_size


def test_finetune_section_sets_the_objectives_parameters_and_the_objectives_fill_the_rest():
    assert finetune_config(load_recipe("generic")).objective_params == check_params({})
    recipe = parse_recipe("name: t\nfinetune: {objective: mix, temperature: 1.5}\n")
    assert recipe.finetune_config().objective_params == {**check_params({}), "temperature": 1.5}
    # the command line's value wins over the recipe's, one key at a time
    given = apply_overrides(recipe, {"finetune.mix_weight": 0.25, "finetune.temperature": None})
    assert given.finetune_config().objective_params == {"temperature": 1.5, "mix_weight": 0.25}
    for text, message in [
        ("temperature: 0", "finetune.temperature: `temperature` must be > 0"),
        ("mix_weight: 2", "finetune.mix_weight: `mix_weight` must be in [0, 1]"),
        ("temperature: warm", "finetune.temperature: Input should be a valid"),
    ]:
        with pytest.raises(DlncError, match=re.escape(message)):
            parse_recipe(f"name: t\nfinetune: {{{text}}}\n")
    with pytest.raises(DlncError, match=r"^--temperature: `temperature` must be > 0"):
        apply_overrides(recipe, {"finetune.temperature": -1.0}, FLAG_NAMES)


# ---- dlnc recipes ----------------------------------------------------------------------------


def test_recipes_list_names_every_recipe_and_its_model_types():
    result = runner.invoke(app, ["recipes", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in SHIPPED:
        assert name in result.output
    assert "mistral" in result.output and "keep 0.7" in result.output


def test_recipes_show_prints_the_file_and_resolved_prints_every_key():
    result = dlnc("recipes", "show", "llama")
    assert result.exit_code == 0
    assert result.output == find_recipe("llama").read_text()  # comments included
    resolved = dlnc("recipes", "show", "llama", "--resolved")
    assert parse_recipe(resolved.output) == load_recipe("llama")
    assert "energy: null" in resolved.output


def test_recipes_show_of_a_bad_file_is_one_error_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("ranks: {keep: 0.5, multipel: 8}\n")
    result = dlnc("recipes", "show", tmp_path / "bad.yaml")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: recipe {tmp_path / 'bad.yaml'}: ranks.multipel: unknown key (allowed: method, "
        "keep, energy, rank, multiple, overrides, dense_at_breakeven, speed, correct)"
    ]
    assert dlnc("recipes", "show", "nope").exit_code == 1


def test_import_compressor_stays_light():
    code = (
        "import sys, compressor, compressor.workflows.compress; "
        "print(sorted(m for m in ('pydantic', 'yaml', 'rich', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_recipe_line_comes_with_the_results_not_before_an_error(tmp_path):
    result = dlnc("compress", tmp_path / "missing", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "recipe:" not in result.output
