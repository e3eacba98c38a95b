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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

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

from compressor.core.ranks import RankPolicy
from compressor.errors import DlncError
from compressor.options import ExportOptions, TargetOptions, check_pattern
from compressor.training.config import FinetuneConfig
from compressor.training.data import DataOptions
from compressor.training.objectives import objective_names

T = TypeVar("T")

__all__ = [
    "GENERIC",
    "Chain",
    "Finetune",
    "Ranks",
    "Recipe",
    "Targets",
    "apply_overrides",
    "find_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_names",
    "recipe_to_yaml",
    "recipes_dir",
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


def _pattern(pattern: str) -> str:
    return _checked(check_pattern, pattern)


def _checked(build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`build(...)`, the option group that checks these values, its error a pydantic one: the
    ranges live in the groups (`compressor.options`), never here too."""
    try:
        return build(*args, **kwargs)
    except DlncError as e:
        raise ValueError(str(e)) from None


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
        return None if value is None else [_pattern(p) for p in value]

    def options(self, origins: Mapping[str, str] | None = None) -> TargetOptions:
        """The `TargetOptions` of this section; `origins` says where the patterns came from."""
        include = list(self.include) if self.include is not None else None
        return TargetOptions(include, list(self.exclude), list(self.square_only),
                             dict(origins or {}))  # fmt: skip


class Ranks(_Section):
    """How ranks are chosen: exactly one of `keep`, `energy`, `rank` (`RankPolicy` checks)."""

    # the spectral initialization; auto: whiten with --data, dynamics with --reference, else svd
    method: Annotated[str, AfterValidator(_rank_method)] = "auto"
    keep: float | None = None  # fraction of targeted weights kept, in (0, 1)
    energy: float | None = None  # per-layer spectral energy kept, in (0, 1]
    rank: int | None = None  # one rank for every layer
    multiple: int = 1  # round every rank to a multiple of this
    # fixed ranks by pattern (name, dotted suffix or re:), e.g. {down_proj: 256}
    overrides: dict[str, Annotated[int, _at_least(1)]] = Field(default_factory=dict)
    dense_at_breakeven: bool = True  # keep a layer dense when its rank reaches break-even
    # smallest: ranks for the budget alone; never-slower: no factorized layer slower than dense
    # on the run's device (measured once per device, cached)
    speed: str = "smallest"
    # with data: refit the factors block by block on the inputs the compressed layers before
    # them produce (error-correcting calibration); --correct / --no-correct override it
    correct: bool = True

    @field_validator("overrides")
    @classmethod
    def _override_patterns(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern in value:
            _pattern(pattern)
        return value

    @model_validator(mode="after")
    def _valid(self) -> Ranks:
        _checked(self.policy)
        return self

    def policy(self) -> RankPolicy:
        """The `RankPolicy` of this section (override keys are still patterns)."""
        return RankPolicy(rank=self.rank, energy=self.energy, keep=self.keep,
                          multiple=self.multiple, overrides=dict(self.overrides),
                          dense_at_breakeven=self.dense_at_breakeven,
                          speed=self.speed)  # fmt: skip


class Chain(_Section):
    """The factorized chain while it is fine-tuned (export always collapses to 2 factors)."""

    depth: int = 2  # number of factors: U, depth-2 square C_i, V (>= 2)
    outer_lr_scale: float = 1.0  # discrepant lr: outer factors x this (> 0)

    @model_validator(mode="after")
    def _valid(self) -> Chain:
        _checked(FinetuneConfig, depth=self.depth, outer_lr_scale=self.outer_lr_scale)
        return self


class Finetune(_Section):
    """Fine-tuning defaults, used when fine-tuning runs (`--finetune-steps`, `dlnc finetune`)."""

    objective: Annotated[str, AfterValidator(_objective)] = "distill"  # a registered objective
    lr: float = 1e-4  # learning rate of the inner factors (> 0)
    steps: int = 200  # optimizer steps when fine-tuning runs (>= 1)
    batch_size: int = 8  # samples per step (>= 1)
    max_length: int | None = 128  # tokens per sample (>= 1; None: images)
    # the objectives' parameters (None: the objective's default, compressor.training.objectives)
    temperature: float | None = None  # distillation temperature on logits (> 0)
    mix_weight: float | None = None  # "mix": weight of the distillation term (in [0, 1])

    @property
    def objective_params(self) -> dict[str, float]:
        """The objectives' parameters this section sets (`FinetuneConfig.objective_params`)."""
        given = {"temperature": self.temperature, "mix_weight": self.mix_weight}
        return {name: value for name, value in given.items() if value is not None}

    @model_validator(mode="after")
    def _valid(self) -> Finetune:
        _checked(FinetuneConfig, steps=self.steps, lr=self.lr, objective=self.objective,
                 objective_params=self.objective_params)  # fmt: skip
        _checked(self.data_options, Path("."))
        return self

    def data_options(self, path: str | Path, **extra: Any) -> DataOptions:
        """`DataOptions` for fine-tuning data: this batch size and max length."""
        lengths = {} if self.max_length is None else {"max_length": self.max_length}
        return DataOptions(Path(path), batch_size=self.batch_size, **{**lengths, **extra})


class Quantize(_Section):
    """How `--quantize` stores codes for this family (used only when it is given)."""

    group_size: int | None = None  # inputs a scale covers (0: a row; None: int8 a row, int4 64)

    @model_validator(mode="after")
    def _valid(self) -> Quantize:
        if self.group_size is not None:
            _checked(ExportOptions, quantize="int4", group_size=self.group_size)
        return self


class Recipe(_Section):
    """One model family's defaults."""

    name: str  # how `--recipe NAME` and `dlnc recipes show NAME` refer to it
    description: str = ""  # one line for `dlnc recipes list`
    model_types: list[str] = Field(default_factory=list)  # config.json model_types it serves
    targets: Targets = Field(default_factory=Targets)
    ranks: Ranks = Field(default_factory=lambda: Ranks(keep=0.5))
    chain: Chain = Field(default_factory=Chain)
    finetune: Finetune = Field(default_factory=Finetune)
    quantize: Quantize = Field(default_factory=Quantize)

    def finetune_config(self, **extra: Any) -> FinetuneConfig:
        """The `FinetuneConfig` of the `finetune` section plus the chain's depth and discrepant
        learning rate; `extra` sets other fields (seed, save_every) and wins over the recipe."""
        f = self.finetune
        chain = self.chain
        values = {"steps": f.steps, "lr": f.lr, "objective": f.objective,
                  "objective_params": f.objective_params,
                  "outer_lr_scale": chain.outer_lr_scale, "depth": chain.depth}  # fmt: skip
        return FinetuneConfig(**{**values, **extra})


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
    if first["type"] == "extra_forbidden":
        message = f"unknown key (allowed: {', '.join(_allowed_keys(loc[:-1]))})"
    else:
        message = first["msg"].removeprefix("Value error, ")
        named = re.match(r"`(\w+)`", message)  # a section's group names the key at fault
        if named and named.group(1) in _allowed_keys(loc) and named.group(1) not in loc:
            loc.append(named.group(1))
    key = ".".join(loc)
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
