"""Which shipped recipe serves a checkpoint: `--recipe auto` picks by its `model_type`; a
family no recipe claims gets the recipe whose target names match its layers (`structure`),
and only when none does the `generic` recipe with a warning; tensor mode (no config) gets
generic silently. `recipe_record` is what report.json says about the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compressor.recipes.schema import GENERIC, Recipe, find_recipe, load_recipe, recipe_names
from compressor.recipes.structure import best_fit, checkpoint_model_type, skeleton

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RecipeSource", "choose_recipe", "claimed", "recipe_record", "select_recipe"]


def select_recipe(
    model_type: str | None, model: nn.Module | None = None
) -> tuple[Recipe, str | None]:
    """The shipped recipe for `model_type`, and a warning when it falls back to generic.

    A recipe claiming `model_type` wins; else the one that fits `model`'s structure (its
    module tree, see `structure`); else generic with a warning. `model_type=None` (tensor
    mode: no architecture) takes the generic recipe without warning.
    """
    recipes = [load_recipe(name) for name in recipe_names()]
    for recipe in recipes:
        if model_type is not None and model_type in recipe.model_types:
            return recipe, None
    if model_type is None:
        return load_recipe(GENERIC), None
    if model is not None:
        fits = best_fit(model, ((r, r.targets.include, r.targets.exclude) for r in recipes))
        if fits is not None:
            return fits, None
    return load_recipe(GENERIC), (
        f"no recipe for model_type {model_type!r} and no recipe's layer names match its "
        "structure: using the generic recipe (every Linear but embeddings and heads); pass "
        "`recipe` to choose another"
    )


def claimed(model_type: str | None) -> bool:
    """True when a shipped recipe lists `model_type` in its `model_types`."""
    return any(model_type in load_recipe(name).model_types for name in recipe_names())


@dataclass(frozen=True)
class RecipeSource:
    """Where a recipe came from, for messages and report.json."""

    path: str  # the YAML file it was read from
    # "auto (model_type llama)", "auto (model_type olmo2, by its layer names)",
    # "auto (tensor mode)" or "--recipe"
    picked_by: str
    warning: str | None = None  # set when `auto` fell back to the generic recipe


def choose_recipe(
    spec: str,
    model_path: str | Path,
    config: str | Path | None = None,
    tensor_mode: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Recipe, RecipeSource]:
    """The recipe for `--recipe SPEC`: `auto` picks by the checkpoint's model_type, else by
    its structure (`select_recipe`; the module tree is built on the meta device only then),
    else generic (also in tensor mode); anything else is a shipped name or a path."""
    if spec != "auto":
        path = find_recipe(spec)
        return load_recipe(path), RecipeSource(str(path), "--recipe")
    model_type = None if tensor_mode else checkpoint_model_type(model_path, config)
    model = None
    if model_type is not None and not claimed(model_type):
        model = skeleton(model_path, config, trust_remote_code)
    recipe, warning = select_recipe(model_type, model)
    how = f"auto (model_type {model_type})" if model_type else "auto (tensor mode)"
    if model_type and model_type not in recipe.model_types and warning is None:
        how = f"auto (model_type {model_type}, by its layer names)"
    return recipe, RecipeSource(str(find_recipe(recipe.name)), how, warning)


def recipe_record(recipe: Recipe, source: RecipeSource) -> dict:
    """What report.json records: the recipe's name, file, how it was picked, and the
    effective values (after command-line overrides)."""
    return {
        "name": recipe.name,
        "path": source.path,
        "picked_by": source.picked_by,
        "warning": source.warning,
        "values": recipe.model_dump(mode="json"),
    }
