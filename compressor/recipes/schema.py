"""Recipes: per-architecture defaults, read from YAML into validated objects.

A recipe says which modules to compress (`targets`), how to choose their ranks (`ranks`), the
chain depth and discrepant learning rate (`chain`) and the fine-tuning defaults (`finetune`).
The shipped recipes are `recipes/*.yaml`; a user's own YAML file is read the same way. Every
section forbids unknown keys, so a typo is an error that names the key, never a silent default.

Precedence, highest first:
  1. a command-line flag that was given (`--keep`, `--include`, `--depth`, ...);
  2. the recipe's value;
  3. the schema's built-in default (the field defaults below).
Details:
  - `--keep`, `--energy` and `--rank` are one choice: giving any of them replaces the
    recipe's whole budget (recipe `keep: 0.6` + `--energy 0.9` -> energy 0.9, no keep);
  - an explicit `--rank N` is used as given: the recipe's `multiple` rounds it only when
    `--multiple` is given too;
  - a list flag (`--include`, `--exclude`) replaces the recipe's list, it is not appended;
  - `ranks.overrides` stay in force under any budget flag;
  - `ranks.method: auto` leaves the method to the data options (whiten with --data,
    dynamics with --reference, else svd); `--method` wins over any recipe method.
Heads (the LM head, classifiers, poolers) are always left alone (`targets.DEFAULT_EXCLUDE`);
recipes need not list them. docs/recipes.md says the same for users.

`--recipe auto` picks by the checkpoint's `model_type` (`select_recipe`); a family no recipe
claims gets the recipe whose target names match its layers (`structure`), and only when none
does the `generic` recipe with a warning; tensor mode (no config) gets generic silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from compressor.errors import DlncError
from compressor.recipes.structure import best_fit, checkpoint_model_type, skeleton
from compressor.training.objectives import objective_names

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "GENERIC",
    "Chain",
    "Finetune",
    "Ranks",
    "Recipe",
    "RecipeSource",
    "Targets",
    "apply_overrides",
    "checkpoint_model_type",
    "choose_recipe",
    "claimed",
    "find_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_names",
    "recipe_record",
    "recipe_to_yaml",
    "recipes_dir",
    "select_recipe",
]

GENERIC = "generic"
"""The fallback recipe: every dense layer but embeddings and heads."""


BUDGET_KEYS = ("keep", "energy", "rank")


class _Section(BaseModel):
    # strict: a quoted number or a float rank is a wrong type, not something to coerce
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _at_least(low: int) -> AfterValidator:
    def check(value: int, info: ValidationInfo) -> int:
        if value < low:
            raise ValueError(f"`{info.field_name}` must be >= {low}, got {value}")
        return value

    return AfterValidator(check)


def _positive() -> AfterValidator:
    def check(value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"`{info.field_name}` must be > 0, got {value}")
        return value

    return AfterValidator(check)


def _in(low: float, high: float, close: str) -> AfterValidator:
    """An interval open at `low`, closed at `high` when `close` is "]"."""

    def check(value: float, info: ValidationInfo) -> float:
        if not (low < value < high or (close == "]" and value == high)):
            raise ValueError(f"`{info.field_name}` must be in ({low}, {high}{close}, got {value}")
        return value

    return AfterValidator(check)


def _rank_method(name: str) -> str:
    """`auto` or a registered rank method (`compressor.methods`)."""
    from compressor import methods

    return _registered(name, ("auto", *methods.names()))


def _objective(name: str) -> str:
    """A registered fine-tuning objective (`compressor.training.objectives`)."""
    return _registered(name, objective_names())


def _registered(name: str, choices: tuple[str, ...]) -> str:
    if name not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1])
        raise ValueError(f"Input should be {listed} or {choices[-1]!r}")
    return name


def _check_pattern(pattern: str) -> str:
    if not pattern:
        raise ValueError("empty pattern")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"bad regex {pattern!r} ({e})") from None
    return pattern


class Targets(_Section):
    """Which dense layers to compress; names match a module or a dotted suffix of it."""

    include: list[str] | None = None  # names or `re:` regexes; None: every Linear/Conv1D
    exclude: list[str] = Field(default_factory=list)  # names or `re:` regexes to leave alone
    # targeted only where the layer is square (k_proj/v_proj: square without grouped-query
    # attention, narrow with it); where not square they stay dense
    square_only: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude", "square_only")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_check_pattern(p) for p in value]


class Ranks(_Section):
    """How ranks are chosen: exactly one of `keep`, `energy`, `rank`."""

    # the spectral initialization; auto: whiten with --data, dynamics with --reference, else svd
    method: Annotated[str, AfterValidator(_rank_method)] = "auto"
    keep: Annotated[float, _in(0, 1, ")")] | None = None  # fraction of targeted weights kept
    energy: Annotated[float, _in(0, 1, "]")] | None = None  # per-layer spectral energy kept
    rank: Annotated[int, _at_least(1)] | None = None  # one rank for every layer
    multiple: Annotated[int, _at_least(1)] = 1  # round every rank to a multiple of this
    # fixed ranks by pattern (name, dotted suffix or re:), e.g. {down_proj: 256}
    overrides: dict[str, Annotated[int, _at_least(1)]] = Field(default_factory=dict)
    dense_at_breakeven: bool = True  # keep a layer dense when its rank reaches break-even

    @field_validator("overrides")
    @classmethod
    def _override_patterns(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern in value:
            _check_pattern(pattern)
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> Ranks:
        chosen = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one of keep, energy, rank (got {chosen or 'none'})")
        return self


class Chain(_Section):
    """The factorized chain while it is fine-tuned (export always collapses to 2 factors)."""

    depth: Annotated[int, _at_least(2)] = 2  # number of factors: U, depth-2 square C_i, V
    outer_lr_scale: Annotated[float, _positive()] = 1.0  # discrepant lr: outer factors x this


class Finetune(_Section):
    """Fine-tuning defaults, used when fine-tuning runs (`--finetune-steps`, `dlnc finetune`)."""

    objective: Annotated[str, AfterValidator(_objective)] = "distill"  # a registered objective
    lr: Annotated[float, _positive()] = 1e-4  # learning rate of the inner factors
    steps: Annotated[int, _at_least(1)] = 200  # optimizer steps when fine-tuning runs
    batch_size: Annotated[int, _at_least(1)] = 8  # samples per step
    max_length: Annotated[int, _at_least(1)] | None = 128  # tokens per sample (None: images)


class Recipe(_Section):
    """One model family's defaults."""

    name: str  # how `--recipe NAME` and `dlnc recipes show NAME` refer to it
    description: str = ""  # one line for `dlnc recipes list`
    model_types: list[str] = Field(default_factory=list)  # config.json model_types it serves
    targets: Targets = Field(default_factory=Targets)
    ranks: Ranks = Field(default_factory=lambda: Ranks(keep=0.5))
    chain: Chain = Field(default_factory=Chain)
    finetune: Finetune = Field(default_factory=Finetune)


# ---- reading and writing ------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """A validated `Recipe` from YAML text; errors name `where` and the key path."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise DlncError(f"recipe {where}: not valid YAML ({at}{getattr(e, 'problem', e)})") from e
    if not isinstance(data, dict):
        raise DlncError(f"recipe {where}: expected a mapping of keys (name, targets, ranks, ...)")
    data.setdefault("name", Path(where).stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise DlncError(f"recipe {where}: {_explain(e)}") from e


def recipe_to_yaml(recipe: Recipe) -> str:
    """The recipe as YAML, every key spelled out (defaults included), in schema order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _explain(error: ValidationError, flags: Mapping[str, str] | None = None) -> str:
    """The first problem as `key.path: message`, naming the flag when one supplied the value."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        message = f"unknown key (allowed: {', '.join(_allowed_keys(loc[:-1]))})"
    else:
        message = first["msg"].removeprefix("Value error, ")
    more = error.error_count() - 1
    suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    for path, flag in (flags or {}).items():
        if key == path or key.startswith(path + "."):
            return f"{flag}: {message}{suffix}"
    return f"{key or 'recipe'}: {message}{suffix}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            break
        model = field.annotation
    return list(model.model_fields)


# ---- finding recipes ----------------------------------------------------------------------


def recipes_dir() -> Path:
    """The shipped recipes: the repository's `recipes/` beside the package (a checkout or an
    editable install), else the copy installed as package data (`compressor/recipes/shipped`)."""
    beside = Path(__file__).resolve().parents[2] / "recipes"
    if beside.is_dir():
        return beside
    from importlib.resources import files

    return Path(str(files("compressor") / "recipes" / "shipped"))


def recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_recipe(name_or_path: str | Path) -> Path:
    """The YAML file for a shipped recipe name or a user's path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = path.suffix in (".yaml", ".yml") or "/" in text or "\\" in text
    if looks_like_path or path.is_file():
        if not path.is_file():
            raise DlncError(f"recipe {text}: no such file")
        return path
    shipped = recipes_dir() / f"{text}.yaml"
    if not shipped.is_file():
        names = ", ".join(recipe_names()) or "none found"
        raise DlncError(f"no recipe named {text!r}; shipped: {names} (or give a .yaml path)")
    return shipped


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (`llama`) or a user's YAML file, validated."""
    path = find_recipe(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DlncError(f"recipe {path}: cannot be read ({e})") from e
    where = path.name if path.parent == recipes_dir() else str(path)
    return parse_recipe(text, where)


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


# ---- recipe + flags -> options --------------------------------------------------------------


def apply_overrides(
    recipe: Recipe, overrides: Mapping[str, Any], flags: Mapping[str, str] | None = None
) -> Recipe:
    """The recipe with the given values replaced: `{"ranks.keep": 0.3, "chain.depth": None}`.

    `None` means "not given" and keeps the recipe's value. Giving any of `ranks.keep`,
    `ranks.energy`, `ranks.rank` clears the other two; `ranks.rank` without `ranks.multiple`
    also drops the recipe's rounding. Errors name the recipe key, or the flag that `flags`
    maps it to (a command line passes its own names).
    """
    flags = dict(flags or {})
    data = recipe.model_dump()
    given = {k: v for k, v in overrides.items() if v is not None}
    if any(k in given for k in (f"ranks.{b}" for b in BUDGET_KEYS)):
        for budget in BUDGET_KEYS:
            data["ranks"][budget] = None
    if "ranks.rank" in given and "ranks.multiple" not in given:
        data["ranks"]["multiple"] = 1  # an explicit --rank is taken as given, not rounded
    for key, value in given.items():
        section, _, field = key.partition(".")
        if section not in data or not isinstance(data[section], dict) or not field:
            raise DlncError(f"{key}: not a recipe key (use section.key, e.g. ranks.keep)")
        data[section][field] = list(value) if isinstance(value, tuple) else value
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise DlncError(_explain(e, {k: flags.get(k, k) for k in given})) from e


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
