"""The `dlnc` section of an export's config.json (`io/section.py`): an edited or damaged section
is one line naming what is wrong, from `load_pretrained` and from the CLI alike."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_helpers import dlnc, one_line_error, token_file

from compressor.errors import DlncError


def edit_section(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def first_layer(config) -> dict:
    return next(iter(config["dlnc"]["layers"].values()))


EDITS = {
    "shape": (lambda c: first_layer(c).update(shape=[7, 5]), r"expected .*found"),
    "rank": (lambda c: first_layer(c).update(rank=5), r"rank 5\b.*found"),
    "string": (lambda c: c.update(dlnc="hello"), r"`dlnc` section"),
    "layers-list": (lambda c: c["dlnc"].update(layers=[1, 2]), r"`layers`"),
    "no-shape": (lambda c: first_layer(c).pop("shape"), r"shape"),
    "bad-rank": (lambda c: first_layer(c).update(rank="four"), r"rank"),
    "version": (lambda c: c["dlnc"].update(format_version="x"), r"format_version"),
}


@pytest.mark.parametrize("damage", [*EDITS, "json"])
def test_an_edited_export_is_one_line(damage, exported):
    from compressor.io.load import load_pretrained

    if damage == "json":
        (exported / "config.json").write_text('{"dlnc": ')
        pattern = "not valid JSON"
    else:
        edit, pattern = EDITS[damage]
        edit_section(exported, edit)
    with pytest.raises(DlncError, match=pattern) as info:
        load_pretrained(exported)
    assert "\n" not in str(info.value)
    result = dlnc("eval", exported, "--data", token_file(exported.parent / "t.safetensors"))
    one_line_error(result)


def test_an_edited_shape_names_the_tensor_and_both_shapes(exported):
    from compressor.io.load import load_pretrained

    edit_section(exported, lambda c: first_layer(c).update(rank=5))
    with pytest.raises(DlncError) as info:
        load_pretrained(exported)
    name = next(iter(json.loads((exported / "config.json").read_text())["dlnc"]["layers"]))
    assert re.search(rf"{re.escape(name)}\.(up|down)\.weight", str(info.value))
    assert "[" in str(info.value) and "4" in str(info.value)


# through transformers: the same checks, the same refusal --------------------------------

DAMAGES = {
    "factor-deleted": None,  # a factor tensor removed from the weights
    "shard-missing": None,  # a shard the index lists, deleted
    "layer-removed": (lambda c: c["dlnc"]["layers"].pop(next(iter(c["dlnc"]["layers"]))),
                      r"is stored as factors .* but the `dlnc` section does not list it"),
    "no-layers": (lambda c: c["dlnc"].update(layers={}), "does not list it"),
    "format-3": (lambda c: c["dlnc"].update(format_version=3), r"newer dlnc \(format 3\)"),
    "rank-string": (lambda c: first_layer(c).update(rank="21"), "integer >= 1, got '21'"),
    "rank-float": (lambda c: first_layer(c).update(rank=21.0), "integer >= 1, got 21.0"),
    "rank-bool": (lambda c: first_layer(c).update(rank=True), "integer >= 1, got True"),
}  # fmt: skip


@pytest.fixture(scope="module")
def sharded_export(tmp_path_factory):
    """A tiny GPT-2 compressed at rank 4, its weights in several shards."""
    from conftest import build_tiny

    root = tmp_path_factory.mktemp("sharded")
    build_tiny("gpt2").save_pretrained(root / "gpt2")
    out = root / "export"
    result = dlnc("compress", root / "gpt2", "--rank", 4, "--no-generate", "--out", out,
                  "--max-shard-size", "5KB")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def damaged(source, tmp_path, damage: str) -> tuple:
    """A copy of the export with `damage`, and the pattern of the refusal it must get."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / damage
    shutil.copytree(source, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    if damage == "factor-deleted":
        key = next(k for k in sorted(index) if k.endswith(".down.weight"))
        shard = folder / index[key]
        tensors = load_file(shard)
        del tensors[key]
        save_file(tensors, shard, metadata={"format": "pt"})
        name = key.removesuffix(".down.weight")
        return folder, re.escape(f"the `dlnc` section lists {name}, but there is no {key}")
    if damage == "shard-missing":
        shard = folder / sorted(set(index.values()))[-1]
        shard.unlink()
        return folder, re.escape(f"{shard}: weight file listed in the index is missing")
    edit, pattern = DAMAGES[damage]
    edit_section(folder, edit)
    return folder, pattern


@pytest.mark.parametrize("damage", DAMAGES)
def test_from_pretrained_refuses_what_load_pretrained_refuses(damage, sharded_export, tmp_path):
    """`AutoModelForCausalLM.from_pretrained` after `import compressor` used to load these
    silently wrong (random factors or dense weights, a newer format) or fail with a raw
    TypeError; it now runs load_pretrained's own checks (io/section.check_export)."""
    from transformers import AutoModelForCausalLM

    from compressor.io.load import load_pretrained

    folder, pattern = damaged(sharded_export, tmp_path, damage)
    with pytest.raises(DlncError) as ours:
        load_pretrained(folder)
    with pytest.raises(DlncError) as theirs:
        AutoModelForCausalLM.from_pretrained(folder)
    assert str(theirs.value) == str(ours.value)
    assert re.search(pattern, str(ours.value)), str(ours.value)
    assert "\n" not in str(ours.value)


def test_an_intact_sharded_export_loads_through_both(sharded_export):
    from transformers import AutoModelForCausalLM

    from compressor.io.load import load_pretrained

    a, b = load_pretrained(sharded_export), AutoModelForCausalLM.from_pretrained(sharded_export)
    ids = torch.arange(1, 9).reshape(1, 8)
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
