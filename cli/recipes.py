"""`dlnc recipes`: the shipped per-family defaults, listed and shown."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import print_json, stdout_console, user_errors
from cli.flags import JsonOut

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Per-family defaults used by `dlnc compress --recipe`.",
)


@app.command("list")
def list_recipes(json_out: JsonOut = False) -> None:
    """The shipped recipes: name, the model_types `--recipe auto` picks them for, and budget.

    With --json, every recipe whole (each key with its value, defaults included) and its file.
    """
    from compressor.recipes.schema import find_recipe, load_recipe, recipe_names, recipes_dir

    with user_errors():
        recipes = [load_recipe(name) for name in recipe_names()]
    if json_out:
        print_json([{**r.model_dump(mode="json"), "path": str(find_recipe(r.name))}
                    for r in recipes])  # fmt: skip
        return
    table = Table(
        title=f"dlnc recipes ({recipes_dir()})",
        caption="a model type none lists: the recipe whose layer names match, else generic",
    )
    for col in ("name", "model types", "budget", "depth", "description"):
        table.add_column(col, overflow="fold")
    for r in recipes:
        table.add_row(
            r.name,
            ", ".join(r.model_types) or "(fallback, tensor mode)",
            _budget(r.ranks),
            str(r.chain.depth),
            r.description,
        )
    stdout_console().print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="A shipped recipe name, or a path to a .yaml file.")],
    resolved: Annotated[
        bool, typer.Option(help="Print every key with its value (defaults included), no comments.")
    ] = False,
) -> None:
    """Print a recipe's YAML (validated first, so a broken file is an error, not a listing)."""
    from compressor.recipes.schema import find_recipe, load_recipe, recipe_to_yaml

    with user_errors():
        path = find_recipe(name)
        recipe = load_recipe(path)
        text = recipe_to_yaml(recipe) if resolved else path.read_text(encoding="utf-8")
    typer.echo(text, nl=not text.endswith("\n"))


def _budget(ranks) -> str:
    if ranks.keep is not None:
        text = f"keep {ranks.keep}"
    elif ranks.energy is not None:
        text = f"energy {ranks.energy}"
    else:
        text = f"rank {ranks.rank}"
    return f"{text} ({ranks.method})"
