"""The `dlnc` app as a whole (`cli/main.py` and what every command shares in `cli/common.py`):
help texts keep their bracketed defaults, rich markup eats no text, and Ctrl-C exits 130."""

from __future__ import annotations

import re

import pytest
from cli_helpers import runner

from cli.main import app


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("compress", "[default: <input>-dlnc beside the input]"),
        ("finetune", "Optimizer steps [recipe]"),
    ],
)
def test_help_texts_keep_their_brackets(command, text):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    flat = " ".join(result.stdout.split())
    assert text in flat
    assert not re.search(r"\w \.(\s|$)", flat)  # "Output folder ." lost its default


def all_params():
    import typer

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")
        for param in command.params:
            yield f"{path} {param.name}", getattr(param, "help", None) or ""

    return list(walk(typer.main.get_command(app), "dlnc"))


def test_no_help_text_loses_text_to_rich_markup():
    """Rich reads `[word]` as a style tag and drops it: every bracket must be escaped."""
    from rich.text import Text

    for where, text in all_params():
        shown = Text.from_markup(text).plain
        assert shown == text.replace("\\[", "["), where


def test_ctrl_c_in_finetune_exits_130(monkeypatch):
    import typer

    from cli.common import user_errors
    from compressor.training.loop import FinetuneInterrupted

    with pytest.raises(typer.Exit) as info, user_errors():
        raise FinetuneInterrupted("interrupted after step 3/10; state saved to s")
    assert info.value.exit_code == 130


def test_the_ctrl_c_message_names_the_flag_of_the_command(capsys):
    """The library says `resume`; `dlnc finetune`'s user types --resume (the interrupt line
    skipped the parameter -> flag mapping every other message gets)."""
    import typer

    from cli.common import user_errors
    from compressor.training.loop import FinetuneInterrupted

    with pytest.raises(typer.Exit) as info, user_errors("finetune"):
        raise FinetuneInterrupted("interrupted; state saved to s; run again with `resume`")
    assert info.value.exit_code == 130
    assert capsys.readouterr().err == "interrupted; state saved to s; run again with --resume\n"


def test_recipes_list_as_json():
    import json

    from compressor.recipes.schema import find_recipe, load_recipe, recipe_names

    result = runner.invoke(app, ["recipes", "list", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [r["name"] for r in listed] == list(recipe_names())
    for row in listed:
        recipe = load_recipe(row["name"])
        assert row["model_types"] == list(recipe.model_types)
        assert row["ranks"]["keep"] == recipe.ranks.keep
        assert row["chain"]["depth"] == recipe.chain.depth
        assert row["path"] == str(find_recipe(row["name"]))


def test_finetune_help_and_the_docs_give_the_same_launch_command():
    """`accelerate launch -m cli.main` ran nothing (cli.main has no __main__ block); the
    help now says what the README and docs/finetune.md say, and that is a script accelerate
    can launch: the `dlnc` console script."""
    from pathlib import Path

    from cli.finetune import LAUNCH

    root = Path(__file__).resolve().parents[1]
    result = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    help_text = " ".join(result.stdout.replace("│", " ").split())
    assert LAUNCH in help_text
    assert LAUNCH.replace("...", "") in " ".join((root / "README.md").read_text().split())
    assert LAUNCH.split(" finetune")[0] in (root / "docs" / "finetune.md").read_text()
    assert "-m cli.main" not in help_text
    assert '"$(which dlnc)"' in LAUNCH  # the console script, as pyproject declares it
    assert 'dlnc = "cli.main:app"' in (root / "pyproject.toml").read_text()
