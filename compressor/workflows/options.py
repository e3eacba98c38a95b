"""Recipe + given values -> the option objects of every workflow. The one place where options
are assembled: the CLI parses flags and calls these; so can a Python user.

Precedence (see `compressor.recipes.schema`): a given value, then the recipe's, then the
schema's default. Values are given by recipe key (`{"ranks.keep": 0.3}`); `flags` maps keys
to the names a caller wants in error messages (the CLI's flags).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor.core.ranks import RankPolicy
from compressor.errors import DlncError
from compressor.io.rankfile import load_ranks, split_ranks
from compressor.recipes.schema import (
    Ranks,
    Recipe,
    RecipeSource,
    apply_overrides,
    choose_recipe,
    recipe_record,
)
from compressor.training.config import FinetuneConfig
from compressor.training.data import DataOptions
from compressor.workflows.compress import CompressOptions
from compressor.workflows.finetune import RecoveryOptions
from compressor.workflows.plan import AwareOptions

__all__ = [
    "apply_ranks_file",
    "aware_options",
    "compress_options",
    "data_options",
    "finetune_config",
    "rank_method",
    "rank_policy",
    "recipe_options",
    "recovery_options",
]

_ORIGIN_KEYS = (
    ("include", "targets.include"),
    ("exclude", "targets.exclude"),
    ("overrides", "ranks.overrides"),
)


def recipe_options(
    spec: str,
    model: str | Path,
    given: Mapping[str, Any],
    flags: Mapping[str, str] | None = None,
    *,
    config: str | Path | None = None,
    tensor_mode: bool = False,
    **runtime: Any,
) -> tuple[CompressOptions, Recipe]:
    """The recipe `spec` (auto, a name or a path) for the checkpoint at `model`, with the
    `given` values (recipe key -> value, None: not given) applied, as `CompressOptions`."""
    trusted = runtime.get("trust_remote_code", False)  # to build an unclaimed family's tree
    recipe, source = choose_recipe(spec, model, config, tensor_mode, trusted)
    recipe = apply_overrides(recipe, given, flags)
    options = compress_options(
        recipe,
        source,
        from_flags=[k for k, v in given.items() if v is not None],
        flags=flags,
        config=config,
        tensor_mode=tensor_mode,
        **runtime,
    )
    return options, recipe


def compress_options(
    recipe: Recipe,
    source: RecipeSource | None = None,
    from_flags: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
    **runtime: Any,
) -> CompressOptions:
    """`CompressOptions` from an (overridden) recipe. `from_flags` lists the recipe keys that
    were given rather than read from the recipe (errors then name the given value, through
    `flags` or as a `parameter`); `runtime` passes what a recipe does not hold (config,
    merge, overwrite, aware, finetune ...)."""
    flags = flags or {}
    origins = {
        key: (
            flags.get(path, f"`{key}`") if path in from_flags else f"recipe {recipe.name}: {path}"
        )
        for key, path in _ORIGIN_KEYS
    }
    record = recipe_record(recipe, source) if source else {"name": recipe.name}
    include = recipe.targets.include
    return CompressOptions(
        policy=rank_policy(recipe.ranks),
        depth=recipe.chain.depth,
        include=list(include) if include is not None else None,
        exclude=list(recipe.targets.exclude),
        square_only=list(recipe.targets.square_only),
        origins=origins,
        recipe=record,
        **runtime,
    )


def rank_policy(ranks: Ranks) -> RankPolicy:
    """The `RankPolicy` of a recipe's `ranks` section (override keys are still patterns)."""
    return RankPolicy(
        rank=ranks.rank,
        energy=ranks.energy,
        keep=ranks.keep,
        multiple=ranks.multiple,
        overrides=dict(ranks.overrides),
        dense_at_breakeven=ranks.dense_at_breakeven,
    )


def aware_options(
    recipe: Recipe | None = None,
    method: str | None = None,
    data: DataOptions | None = None,
    **given: Any,
) -> AwareOptions:
    """`AwareOptions`: `method` if given, else the recipe's (`auto` leaves it to what is given:
    dynamics with a reference or warm-up, whiten with data, else svd). `given` sets the other
    fields (reference, warmup_steps, warmup_lr, damping, output_aware, correct)."""
    return AwareOptions(method=rank_method(recipe, method), data=data, **given)


def rank_method(recipe: Recipe | None, method: str | None = None) -> str:
    """The rank method: `method` if given, else the recipe's (`auto` when there is none)."""
    if method is not None:
        return method
    return recipe.ranks.method if recipe is not None else "auto"


def apply_ranks_file(options: CompressOptions, path: str | Path) -> CompressOptions:
    """`ranks` file: its ranks override the policy's, its `dense` layers are left alone."""
    overrides, dense = split_ranks(load_ranks(path))
    options.policy = replace(options.policy, overrides={**options.policy.overrides, **overrides})
    options.exclude = [*options.exclude, *dense]
    options.origins = {**options.origins, "overrides": f"`ranks` {path}"}
    if dense:
        options.origins["exclude"] = f"`exclude` / `ranks` {path}"
    return options


def finetune_config(recipe: Recipe, **extra: Any) -> FinetuneConfig:
    """The `FinetuneConfig` of a recipe: its `finetune` section plus the chain's depth and
    discrepant learning rate; `extra` sets other fields (seed, save_every) and wins over the
    recipe, as a given value does."""
    f = recipe.finetune
    values = {
        "steps": f.steps,
        "lr": f.lr,
        "objective": f.objective,
        "outer_lr_scale": recipe.chain.outer_lr_scale,
        "depth": recipe.chain.depth,
    }
    return FinetuneConfig(**{**values, **extra})


def data_options(recipe: Recipe, path: str | Path, **extra: Any) -> DataOptions:
    """The `DataOptions` for fine-tuning data: the recipe's batch size and max length."""
    lengths = (
        {} if recipe.finetune.max_length is None else {"max_length": recipe.finetune.max_length}
    )
    return DataOptions(Path(path), batch_size=recipe.finetune.batch_size, **{**lengths, **extra})


def recovery_options(
    recipe: Recipe,
    data: str | Path | None,
    config: Mapping[str, Any] | None = None,
    data_kw: Mapping[str, Any] | None = None,
    eval_data: str | Path | None = None,
    **given: Any,
) -> RecoveryOptions:
    """Fine-tuning on `data` (and held-out `eval_data`) with the recipe's settings: `config`
    overrides FinetuneConfig fields, `data_kw` DataOptions fields, `given` the other
    RecoveryOptions fields (eval_fraction, state_dir, resume)."""
    if data is None:
        raise DlncError("`finetune_steps` needs `finetune_data` FILE")
    data_kw = dict(data_kw or {})
    return RecoveryOptions(
        data=data_options(recipe, data, **data_kw),
        eval_data=data_options(recipe, eval_data, **data_kw) if eval_data is not None else None,
        config=finetune_config(recipe, **(config or {})),
        **given,
    )
