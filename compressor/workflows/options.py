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
from compressor.io.checkpoint import resolve_model
from compressor.io.rankfile import load_ranks, split_ranks
from compressor.options import (
    CompressOptions,
    ExportOptions,
    FinetuneOptions,
    LoadOptions,
    MethodOptions,
    RunOptions,
    TargetOptions,
)
from compressor.recipes.choose import RecipeSource, choose_recipe, recipe_record
from compressor.recipes.schema import Ranks, Recipe, apply_overrides
from compressor.training.config import FinetuneConfig
from compressor.training.data import DataOptions

__all__ = [
    "apply_ranks_file",
    "compress_options",
    "data_options",
    "finetune_config",
    "finetune_options",
    "inspect_options",
    "method_options",
    "rank_method",
    "rank_policy",
    "recipe_finetune_options",
    "recipe_options",
]

_ORIGIN_KEYS = (
    ("include", "targets.include"),
    ("exclude", "targets.exclude"),
    ("overrides", "ranks.overrides"),
)


def recipe_options(
    spec: str,
    model: str | Path,
    given: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    *,
    load: LoadOptions | None = None,
    method: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    export: ExportOptions | None = None,
    run: RunOptions | None = None,
    ranks_file: str | Path | None = None,
    finetune_data: str | Path | None = None,
    resume: bool = False,
) -> tuple[CompressOptions, Recipe]:
    """The one builder of `CompressOptions`: the recipe `spec` (auto, a name or a path) for
    the checkpoint at `model`, with the `given` values (recipe key -> value, None: not given)
    applied. `method` sets `MethodOptions` fields (the recipe's method unless it names one),
    `data` the calibration `DataOptions` (none without a `path`), `ranks_file` per-layer
    ranks (`apply_ranks_file`); a given `finetune.steps` fine-tunes on `finetune_data`
    (`resume`: continuing an interrupted fine-tuning from its state folder)."""
    given = dict(given or {})
    load = load or LoadOptions()
    model = resolve_model(model, load.revision)
    recipe, source = choose_recipe(
        spec, model, load.config, load.tensor_mode, load.trust_remote_code
    )
    recipe = apply_overrides(recipe, given, flags)
    tune = given.get("finetune.steps") is not None
    if resume and not tune:
        raise DlncError("`resume` continues an interrupted fine-tuning; give `finetune_steps`")
    options = compress_options(
        recipe,
        source,
        from_flags=[k for k, v in given.items() if v is not None],
        flags=flags,
        load=load,
        method=method_options(
            recipe, data=_data(data), tokenizer=(data or {}).get("tokenizer"), **(method or {})
        ),
        export=_export(recipe, export),
        run=run or RunOptions(),
        finetune=finetune_options(recipe, finetune_data, resume=resume) if tune else None,
    )
    if ranks_file is not None:
        options = apply_ranks_file(options, ranks_file)
    return options, recipe


def _export(recipe: Recipe, export: ExportOptions | None) -> ExportOptions:
    """The export options given, `group_size` the recipe's where none was given."""
    export = export or ExportOptions()
    if export.group_size is None and recipe.quantize.group_size is not None:
        export = replace(export, group_size=recipe.quantize.group_size)
    return export


def _data(values: Mapping[str, Any] | None) -> DataOptions | None:
    if not values or values.get("path") is None:
        return None
    return DataOptions(**values)


def compress_options(
    recipe: Recipe,
    source: RecipeSource | None = None,
    from_flags: Collection[str] = (),
    flags: Mapping[str, str] | None = None,
    **groups: Any,
) -> CompressOptions:
    """`CompressOptions` from an (overridden) recipe. `from_flags` lists the recipe keys that
    were given rather than read from the recipe (errors then name the given value, through
    `flags` or as a `parameter`); `groups` passes the groups a recipe does not hold (load,
    method, export, run, finetune)."""
    flags = flags or {}
    origins = {
        key: (
            flags.get(path, f"`{key}`") if path in from_flags else f"recipe {recipe.name}: {path}"
        )
        for key, path in _ORIGIN_KEYS
    }
    record = recipe_record(recipe, source) if source else {"name": recipe.name}
    return CompressOptions(
        policy=rank_policy(recipe.ranks),
        depth=recipe.chain.depth,
        targets=recipe.targets.options(origins),
        recipe=record,
        **groups,
    )


def rank_policy(ranks: Ranks) -> RankPolicy:
    """The `RankPolicy` of a recipe's `ranks` section (override keys are still patterns)."""
    return ranks.policy()


def method_options(
    recipe: Recipe | None = None,
    method: str | None = None,
    data: DataOptions | None = None,
    **given: Any,
) -> MethodOptions:
    """`MethodOptions`: `method` if given, else the recipe's (`auto` leaves it to what is given:
    dynamics with a reference or warm-up, whiten with data, else svd). `given` sets the other
    fields (reference, warmup_steps, warmup_lr, damping, output_aware, correct); `correct`
    None or not given: the recipe's `ranks.correct`."""
    if given.get("correct") is None:
        given.pop("correct", None)  # MethodOptions' default, unless the recipe says
        if recipe is not None:
            given["correct"] = recipe.ranks.correct
    return MethodOptions(method=rank_method(recipe, method), data=data, **given)


def rank_method(recipe: Recipe | None, method: str | None = None) -> str:
    """The rank method: `method` if given, else the recipe's (`auto` when there is none)."""
    if method is not None:
        return method
    return recipe.ranks.method if recipe is not None else "auto"


def apply_ranks_file(options: CompressOptions, path: str | Path) -> CompressOptions:
    """`ranks` file: its ranks override the policy's, its `dense` layers are left alone."""
    overrides, dense = split_ranks(load_ranks(path))
    policy = replace(options.policy, overrides={**options.policy.overrides, **overrides})
    origins = {**options.targets.origins, "overrides": f"`ranks` {path}"}
    if dense:
        origins["exclude"] = f"`exclude` / `ranks` {path}"
    targets = replace(options.targets, exclude=[*options.targets.exclude, *dense], origins=origins)
    return replace(options, policy=policy, targets=targets, ranks_file=Path(path))


def finetune_config(recipe: Recipe, **extra: Any) -> FinetuneConfig:
    """The `FinetuneConfig` of a recipe: its `finetune` section plus the chain's depth and
    discrepant learning rate; `extra` sets other fields (seed, save_every) and wins over the
    recipe, as a given value does."""
    return recipe.finetune_config(**extra)


def data_options(recipe: Recipe, path: str | Path, **extra: Any) -> DataOptions:
    """The `DataOptions` for fine-tuning data: the recipe's batch size and max length."""
    return recipe.finetune.data_options(path, **extra)


def finetune_options(
    recipe: Recipe,
    data: str | Path | None,
    config: Mapping[str, Any] | None = None,
    data_kw: Mapping[str, Any] | None = None,
    eval_data: str | Path | None = None,
    **given: Any,
) -> FinetuneOptions:
    """Fine-tuning on `data` (and held-out `eval_data`) with the recipe's settings: `config`
    overrides FinetuneConfig fields, `data_kw` DataOptions fields, `given` the other
    FinetuneOptions fields (eval_fraction, state_dir, resume)."""
    if data is None:
        raise DlncError("`finetune_steps` needs `finetune_data` FILE")
    data_kw = {k: v for k, v in (data_kw or {}).items() if v is not None}
    return FinetuneOptions(
        data=data_options(recipe, data, **data_kw),
        eval_data=data_options(recipe, eval_data, **data_kw) if eval_data is not None else None,
        config=finetune_config(recipe, **(config or {})),
        **given,
    )


def recipe_finetune_options(
    spec: str,
    model: str | Path,
    given: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> tuple[FinetuneOptions, Recipe]:
    """`dlnc finetune`'s builder: the recipe `spec` for the model at `model` with the `given`
    recipe values applied, then `finetune_options(recipe, **kwargs)`."""
    recipe, _ = choose_recipe(spec, model)
    recipe = apply_overrides(recipe, given or {}, flags)
    return finetune_options(recipe, **kwargs), recipe


def inspect_options(
    spec: str,
    model: str | Path,
    given: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
    load: LoadOptions | None = None,
) -> CompressOptions:
    """`inspect`'s options: a checkpoint's layers as `compress` targets them (the recipe
    `spec` with the `given` values); a dlnc export's factorized layers by the given
    include/exclude only (its recipe chose them when it was compressed)."""
    from compressor.io.section import is_export

    model = resolve_model(model, (load or LoadOptions()).revision)
    if Path(model).is_dir() and is_export(Path(model)):
        given = {k: v for k, v in (given or {}).items() if v is not None}
        targets = TargetOptions(
            given.get("targets.include"),
            list(given.get("targets.exclude", [])),
            origins={k.split(".")[1]: (flags or {}).get(k, f"`{k}`") for k in given},
        )
        return CompressOptions(load=load or LoadOptions(), targets=targets)
    return recipe_options(spec, model, given, flags, load=load)[0]
