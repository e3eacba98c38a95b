"""The `dlnc` section of an export's config.json (`io/section.py`): an edited or damaged section
is one line naming what is wrong, from `load_pretrained` and from the CLI alike."""

from __future__ import annotations

import json
import re

import pytest
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
