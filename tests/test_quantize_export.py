"""Quantized exports: written as integer codes, scales and zero points (no float copy), checked
before they are built, and reloaded by `load_pretrained` and `from_pretrained` with outputs
identical to the quantized model in memory, on every family and in tensor mode; through
`dlnc compress --quantize`, with GPTQ on the calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import dlnc, one_line_error, token_file
from conftest import FAMILIES, MLP, example_inputs, outputs, tree_snapshot
from safetensors.torch import load_file, save_file

from compressor.core import intmm
from compressor.core.compress import compress_
from compressor.core.layers import QuantLinear
from compressor.core.quantize import QuantSpec
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import factorized_layers, quantize_, quantized_layers
from compressor.core.targets import find_targets
from compressor.errors import DlncError
from compressor.io.checkpoint import load_checkpoint
from compressor.io.export import export
from compressor.io.load import load_pretrained
from compressor.options import ExportOptions

ROOT = Path(__file__).resolve().parents[1]

AUTO = {"bert": "AutoModelForMaskedLM", "vit": "AutoModelForImageClassification"}


def quantized(folder, spec=QuantSpec(4, 16)):
    """The checkpoint at `folder` with every other target factorized (keep 0.5) and every
    target quantized by `spec` (to nearest: no data)."""
    loaded = load_checkpoint(folder)
    targets = find_targets(loaded.model)
    chains = dict(list(targets.items())[::2])
    report = compress_(loaded.model, chains, RankPolicy(keep=0.5))
    quantize_(loaded.model, list(targets), spec)
    return loaded, report


@pytest.mark.parametrize("family", FAMILIES)
def test_a_quantized_export_reloads_with_identical_outputs(family, tiny_model, tmp_path):
    _, folder = tiny_model(family)
    loaded, report = quantized(folder)
    assert factorized_layers(loaded.model) and quantized_layers(loaded.model)
    out = export(loaded.model, tmp_path / "out", config=loaded.config, report=report.to_dict())
    section = json.loads((out / "config.json").read_text())["dlnc"]
    assert section["format_version"] == 2
    assert set(section["quantized"]) == set(quantized_layers(loaded.model))
    assert all(spec["bits"] == 4 and spec["group"] == 16 for spec in section["layers"].values())
    stored = load_file(out / "model.safetensors")
    assert not [k for k in stored if k.endswith((".up.weight", ".down.weight"))]
    inputs = example_inputs(family)
    expected = outputs(loaded.model, inputs)
    assert torch.equal(outputs(load_pretrained(out), inputs), expected)
    auto = getattr(transformers, AUTO.get(family, "AutoModelForCausalLM"))
    reloaded = auto.from_pretrained(out).eval()
    assert torch.equal(outputs(reloaded, inputs), expected)
    assert all(b.dtype == torch.uint8 for n, b in reloaded.named_buffers() if "qweight" in n)


def test_the_codes_take_a_quarter_of_the_float_bytes(tiny_model, tmp_path):
    _, folder = tiny_model("llama", hidden_size=64, intermediate_size=128)
    loaded = load_checkpoint(folder)
    targets = find_targets(loaded.model)
    plain = export(loaded.model, tmp_path / "float", config=loaded.config)
    quantize_(loaded.model, list(targets), QuantSpec(8, 0))
    q = export(loaded.model, tmp_path / "int8", config=loaded.config)

    def target_bytes(folder):
        state = load_file(folder / "model.safetensors")
        owned = tuple(f"{n}." for n in targets)
        return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(owned))

    ratio = target_bytes(q) / target_bytes(plain)
    assert 0.25 < ratio < 0.27  # 8 bits a weight and a row's scale and zero, of 32


def test_a_quantized_tensor_mode_export_loads_into_the_users_module(tiny_mlp, tmp_path):
    _, path = tiny_mlp
    loaded = load_checkpoint(path)
    targets = find_targets(loaded.model)
    compress_(loaded.model, {"fc1": targets["fc1"]}, RankPolicy(rank=5))
    quantize_(loaded.model, list(targets), QuantSpec(4, 8))
    mine = load_pretrained(export(loaded.model, tmp_path / "out"), model=MLP())
    assert isinstance(mine.fc1.up, QuantLinear) and isinstance(mine.fc2, QuantLinear)
    assert mine.fc1.rank == 6  # made even for 4-bit codes, two a byte
    x = torch.randn(5, 16)
    t = loaded.model
    with torch.no_grad():
        expected = t.get_submodule("head")(torch.relu(t.fc2(torch.relu(t.fc1(x)))))
        assert torch.equal(mine(x), expected)


def test_dequantize_gives_dense_layers_with_the_same_outputs(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(intmm, "ROWS", 0)  # every matmul dequantized (no bfloat16 kernels)
    _, folder = tiny_model("gpt2")
    loaded, _ = quantized(folder)
    out = export(loaded.model, tmp_path / "out", config=loaded.config)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = example_inputs("gpt2")
    before = outputs(model, inputs)
    model.dequantize()
    assert not factorized_layers(model) and not quantized_layers(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(outputs(model, inputs), before, rtol=1e-4, atol=1e-5)
    assert model.config.dlnc["format_version"] == 1 and "quantized" not in model.config.dlnc


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda state, names: state.pop(f"{names[0]}.scales"), "there is no"),
        (lambda state, names: state.update({f"{names[0]}.zeros": torch.zeros(1, 1)}), "shape"),
    ],
)
def test_a_damaged_quantized_export_is_refused_before_it_is_built(
    damage, message, tiny_model, tmp_path
):
    _, folder = tiny_model("llama")
    loaded, _ = quantized(folder)
    out = export(loaded.model, tmp_path / "out", config=loaded.config)
    state = load_file(out / "model.safetensors")
    damage(state, list(quantized_layers(loaded.model)))
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DlncError, match=message):
        load_pretrained(out)


def test_a_section_with_bad_bits_is_refused(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    loaded, _ = quantized(folder)
    out = export(loaded.model, tmp_path / "out", config=loaded.config)
    config = json.loads((out / "config.json").read_text())
    name = next(iter(config["dlnc"]["quantized"]))
    config["dlnc"]["quantized"][name]["bits"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DlncError, match=r"`bits` one of \(4, 8\)"):
        load_pretrained(out)


def test_compress_quantize_with_data_rounds_by_gptq(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    data = token_file(tmp_path / "tokens.safetensors", rows=24, length=16)
    out = tmp_path / "out"
    result = dlnc("compress", folder, "-o", out, "--keep", "0.5", "--data", data,
                  "--quantize", "int4", "--group-size", "16", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    quant = report["quantization"]
    assert quant["rounding"] == "gptq" and quant["bits"] == 4 and quant["group_size"] == 16
    assert quant["layers"] == len(report["layers"]) + 4  # and k/v, dense under GQA: 2 blocks
    assert 0 < quant["bits_per_weight"] < 32
    assert "after_quantize" in report["perplexity"]
    stored = load_file(out / "model.safetensors")  # loading builds no float copy: all it holds
    assert quant["load_memory_bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
    model = load_pretrained(out)
    assert all(isinstance(m.down, QuantLinear) for m in factorized_layers(model).values())
    card = (out / "README.md").read_text()
    assert "int4" in card


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--quantize", "int3"], "--quantize must be one of int8, int4"),
        (["--quantize", "int4", "--merge"], "--quantize stores factors"),
        (["--quantize", "int4", "--group-size", "-1"], "--group-size must be >= 0"),
        (["--quantize", "int8", "--stream"], "--quantize runs in memory"),
    ],
)
def test_bad_quantize_options_are_one_line_errors_and_write_nothing(
    flags, needle, tiny_model, tmp_path
):
    _, folder = tiny_model("llama")
    out = tmp_path / "out"
    one_line_error(dlnc("compress", folder, "-o", out, *flags), needle)
    assert not out.exists()


def test_dlnc_quantize_stores_an_export_as_codes(tiny_model, tmp_path):
    """An export written before: its factors and the layers the recipe names but leaves
    dense (GQA's k/v) become int8 codes; the input is untouched; the output reloads."""
    _, folder = tiny_model("llama")
    data = token_file(tmp_path / "tokens.safetensors", rows=24, length=16)
    plain = tmp_path / "plain"
    assert dlnc("compress", folder, "-o", plain, "--keep", "0.5").exit_code == 0
    before = tree_snapshot(plain)
    result = dlnc("quantize", plain, "--quantize", "int8", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "plain-int8"
    assert report["out_dir"] == str(out) and tree_snapshot(plain) == before
    assert report["quantization"]["rounding"] == "gptq" and report["quantization"]["layers"] == 14
    model = load_pretrained(out)
    chains = factorized_layers(model)
    assert chains and all(isinstance(m.up, QuantLinear) for m in chains.values())
    kv = model.model.layers[0].self_attn.k_proj
    assert isinstance(kv, QuantLinear) and kv.spec.bits == 8
    assert report["bytes_after"] < report["bytes_before"]
    again = dlnc("quantize", out, "-o", tmp_path / "twice")
    one_line_error(again, "already quantized")
    assert not (tmp_path / "twice").exists()


def test_dlnc_quantize_a_checkpoint_without_data_rounds_to_nearest(tiny_model, tmp_path):
    model, folder = tiny_model("gpt2")
    out = tmp_path / "q"
    result = dlnc("quantize", folder, "-o", out, "--no-generate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["quantization"]["rounding"] == "nearest"
    reloaded = load_pretrained(out)
    assert not factorized_layers(reloaded) and quantized_layers(reloaded)
    inputs = example_inputs("gpt2")
    rel = (outputs(reloaded, inputs) - outputs(model, inputs)).norm() / outputs(
        model, inputs
    ).norm()
    assert 0 < float(rel) < 0.05


def test_compress_refuses_an_export(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    assert dlnc("compress", folder, "-o", tmp_path / "a", "--keep", "0.5").exit_code == 0
    one_line_error(dlnc("compress", tmp_path / "a", "-o", tmp_path / "b"), "dlnc quantize")
    assert not (tmp_path / "b").exists()


def test_a_bits_budget_sets_the_keep_and_is_reported(tiny_model, tmp_path):
    _, folder = tiny_model("llama", hidden_size=64, intermediate_size=128)
    out = tmp_path / "out"
    result = dlnc("compress", folder, "-o", out, "--quantize", "int4", "--group-size", "16",
                  "--bits-per-weight", "3", "--no-generate", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"]["budget"] == 3.0
    assert 0 < report["policy"]["keep"] < 0.6
    assert any("3 bits a weight at int4" in n for n in report["notices"])
    both = dlnc("compress", folder, "-o", tmp_path / "b", "--quantize", "int4", "--keep", "0.5",
                "--bits-per-weight", "3")  # fmt: skip
    one_line_error(both, "--keep and --bits-per-weight")
    alone = dlnc("compress", folder, "-o", tmp_path / "c", "--bits-per-weight", "3")
    one_line_error(alone, "give --quantize")


def test_a_quantized_export_is_not_fine_tuned(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    out = tmp_path / "q"
    assert dlnc("compress", folder, "-o", out, "--quantize", "int8", "--no-generate").exit_code == 0
    data = token_file(tmp_path / "tokens.safetensors")
    result = dlnc("finetune", out, "--data", data, "--steps", "1", "--out", tmp_path / "ft")
    one_line_error(result, "integer codes", "dlnc quantize")
    assert not (tmp_path / "ft").exists()


def test_a_recipes_group_size_is_the_default_and_the_flag_wins(tiny_model, tmp_path):
    from compressor.recipes.schema import parse_recipe
    from compressor.workflows.options import recipe_options

    _, folder = tiny_model("llama")
    text = (ROOT / "recipes" / "llama.yaml").read_text() + "\nquantize:\n  group_size: 16\n"
    recipe = tmp_path / "q.yaml"
    recipe.write_text(text)
    options, _ = recipe_options(str(recipe), folder, export=ExportOptions(quantize="int4"))
    assert options.export.quant == QuantSpec(4, 16)
    given = ExportOptions(quantize="int4", group_size=8)
    options, _ = recipe_options(str(recipe), folder, export=given)
    assert options.export.quant == QuantSpec(4, 8)
    with pytest.raises(DlncError, match="group_size"):
        parse_recipe(text.replace("group_size: 16", "group_size: -2"), "q.yaml")
