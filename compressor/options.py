"""The options of a compression run, one group per stage, each checked once in its
`__post_init__` (errors name the parameter in backticks; the CLI turns it into the flag).

    CompressOptions(
        load=LoadOptions(config=None),          # how the checkpoint is read
        targets=TargetOptions(include=None),    # which layers (`filter_fn(module, fqn)`)
        policy=RankPolicy(keep=0.5),            # how ranks are chosen (compressor.core.ranks)
        method=MethodOptions(method="auto"),    # the rank method and what feeds it
        export=ExportOptions(format="factors"), # what is written
        run=RunOptions(stream=None),            # how it runs (streaming, solver, device)
        finetune=None,                          # FinetuneOptions: fine-tune before export
    )

The recipe schema (`compressor.recipes.schema`) builds these groups from a recipe, and
`compressor.workflows.options` is the one place that adds the given values to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compressor import methods
from compressor.core.gram import RANDOMIZED_MIN_SIZE
from compressor.core.layers import check_depth, dense_weight_of
from compressor.core.quantize import QuantSpec, spec_of
from compressor.core.ranks import RankPolicy
from compressor.core.solver import Solver
from compressor.core.targets import matches
from compressor.core.whitening import DEFAULT_DAMPING
from compressor.errors import DlncError
from compressor.io.export import check_shard_size
from compressor.io.section import check_format
from compressor.training.config import FinetuneConfig
from compressor.training.data import DataOptions

__all__ = [
    "CompressOptions",
    "ExportOptions",
    "FinetuneOptions",
    "LoadOptions",
    "MethodOptions",
    "RunOptions",
    "TargetOptions",
    "check_pattern",
]


def check_pattern(pattern: str) -> str:
    """A module pattern: a name, a dotted suffix, or `re:REGEX` (which must compile)."""
    if not pattern:
        raise DlncError("empty pattern")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise DlncError(f"bad regex {pattern!r} ({e})") from None
    return pattern


@dataclass(frozen=True)
class LoadOptions:
    """How the checkpoint is read."""

    config: Path | None = None  # config.json for a bare weights file
    allow_pickle: bool = False  # accept .bin/.pt (pickle) weights
    trust_remote_code: bool = False  # allow a checkpoint's own Python code
    tensor_mode: bool = False  # ignore config.json: compress the state dict's 2-D weights
    revision: str | None = None  # a Hub name's branch, tag or commit in the local cache


@dataclass(frozen=True)
class TargetOptions:
    """Which layers are compressed: `filter_fn(module, fqn)` (torchao's filter) says it for
    one layer; `core.targets.find_targets` walks the model with it."""

    include: list[str] | None = None  # names or `re:` regexes to compress (None: every dense)
    exclude: list[str] = field(default_factory=list)  # names or `re:` regexes to leave alone
    square_only: list[str] = field(default_factory=list)  # targeted only where in == out
    origins: dict[str, str] = field(default_factory=dict)  # include/exclude/overrides: from where

    def __post_init__(self) -> None:
        for key in ("include", "exclude", "square_only"):
            for pattern in getattr(self, key) or ():
                try:
                    check_pattern(pattern)
                except DlncError as e:
                    raise DlncError(f"`{key}`: {e}") from None

    def chooses(self, fqn: str) -> bool:
        """By name alone: included (or no `include`) and not excluded."""
        if self.include is not None and not any(matches(fqn, p) for p in self.include):
            return False
        return not any(matches(fqn, p) for p in self.exclude)

    def narrow(self, module: nn.Module, fqn: str) -> str | None:
        """The `square_only` pattern that leaves this layer dense (its weight is not square)."""
        for pattern in self.square_only:
            if matches(fqn, pattern) and len(set(dense_weight_of(module).shape)) > 1:
                return pattern
        return None

    def filter_fn(self, module: nn.Module, fqn: str) -> bool:
        """True for a layer these options target: chosen by name, square where asked."""
        return self.chooses(fqn) and self.narrow(module, fqn) is None

    def excluding(self, patterns: Sequence[str]) -> TargetOptions:
        """These options with `patterns` left alone too."""
        return TargetOptions(self.include, [*self.exclude, *patterns], self.square_only,
                             self.origins)  # fmt: skip

    def where(self, key: str) -> str:
        """Where the `include`/`exclude`/`overrides` patterns came from, for messages."""
        return self.origins.get(key, f"--{key}" if key != "overrides" else "rank overrides")


@dataclass(frozen=True)
class MethodOptions:
    """The rank method and what feeds it (data, a reference checkpoint, a warm-up run)."""

    method: str = "auto"  # a registered method (methods.names()), or auto: by what is given
    data: DataOptions | None = None  # calibration / warm-up data
    reference: Path | None = None  # the checkpoint this one was trained or fine-tuned from
    warmup_steps: int = 0  # dynamics: steps of a warm-up run on the data (0: none)
    warmup_lr: float = 1e-4  # learning rate of the warm-up run (AdamW)
    damping: float = DEFAULT_DAMPING  # whiten: relative damping of the Gram matrices
    output_aware: bool = True  # with data: ranks follow each layer's effect on the output
    correct: bool = True  # with data: refit the factors on the compressed model's own inputs
    generate: bool = False  # without data: a causal LM calibrates on text it generates
    tokenizer: Path | None = None  # without data: a text encoder's random word pieces' tokenizer

    def __post_init__(self) -> None:
        if self.method != "auto":
            methods.get(self.method)  # an unknown name is an error listing the known ones
        if self.warmup_steps < 0:
            raise DlncError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps and self.data is None:
            raise DlncError("`warmup_steps` trains on data: give `data`")
        if not self.warmup_lr > 0:
            raise DlncError(f"`warmup_lr` must be > 0, got {self.warmup_lr}")
        if self.damping < 0:
            raise DlncError(f"`damping` must be >= 0, got {self.damping}")
        methods.check_inputs(self.resolved, self.available)

    @property
    def available(self) -> frozenset[str]:
        """The method inputs these options can provide."""
        found = {"grams"} if self.data is not None else set()
        if self.reference is not None or self.warmup_steps:
            found.add("updates")
        return frozenset(found)

    @property
    def resolved(self) -> str:
        """The method that runs: the named one, or the "auto" rule's choice."""
        if self.method == "auto":
            return methods.auto_method(self.available)
        return methods.get(self.method).name


@dataclass(frozen=True)
class ExportOptions:
    """What is written."""

    format: str = "factors"  # io.section.EXPORT_FORMATS: factors, or dense (loadable by any tool)
    overwrite: bool = False  # replace an existing output folder
    max_shard_size: str = "2GB"  # shard the exported weights above this size
    quantize: str | None = None  # int8 | int4: the targeted layers' weights as integer codes
    group_size: int | None = None  # inputs a scale covers (0: a row; None: int8 a row, int4 64)
    bits_per_weight: float | None = None  # with quantize: the budget, stored bits a weight of
    # the quantized layers (sets `keep`, core.quantize.keep_for_bits)

    def __post_init__(self) -> None:
        check_format(self.format)
        check_shard_size(self.max_shard_size)
        if self.quant is not None and self.merge:
            raise DlncError("`quantize` stores factors and layers quantized; not with `merge`")
        if self.bits_per_weight is not None:
            if self.quant is None:
                raise DlncError(
                    "`bits_per_weight` is a budget of quantized weights: give `quantize`"
                )
            if not self.bits_per_weight > 0:
                raise DlncError(f"`bits_per_weight` must be > 0, got {self.bits_per_weight}")

    @property
    def quant(self) -> QuantSpec | None:
        """How the targeted layers are quantized (None: float weights)."""
        return spec_of(self.quantize, self.group_size)

    @property
    def merge(self) -> bool:
        """Dense weights instead of factors."""
        return self.format == "dense"


@dataclass(frozen=True)
class RunOptions:
    """How the run executes: streamed or in memory, the solver, the device, the memory."""

    stream: bool | None = None  # one tensor at a time (memory ~ one layer); None: if too big
    solver: str = "auto"  # how weights are decomposed: auto, exact or randomized
    device: str | None = None  # where the linear algebra runs (None: GPU if there is one)
    large_from: int = RANDOMIZED_MIN_SIZE  # `auto`: layers this wide take the float32 route
    memory: int | None = None  # bytes available (None: measured now, psutil's `available`)

    def __post_init__(self) -> None:
        self.solver_for()  # checks `solver` and `large_from`
        if self.memory is not None and self.memory < 0:
            raise DlncError(f"`memory` must be >= 0, got {self.memory}")

    def solver_for(self, device: str | None = None) -> Solver:
        """The solver these options ask for (`device`: instead of theirs, when given)."""
        return Solver(self.solver, device or self.device, self.large_from)


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning run besides the models: data, training config, resumable state."""

    data: DataOptions  # training data (and the held-out part, unless eval_data is given)
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_data: DataOptions | None = None  # held-out data (None: split eval_fraction off data)
    eval_fraction: float = 0.1  # share of the samples held out when eval_data is None
    state_dir: Path | None = None  # checkpoints of the training state (None: <out>.state)
    resume: bool = False  # continue from the newest checkpoint in state_dir

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise DlncError(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class CompressOptions:
    """Everything `compress_checkpoint` needs besides the input path, by stage."""

    load: LoadOptions = field(default_factory=LoadOptions)
    targets: TargetOptions = field(default_factory=TargetOptions)
    policy: RankPolicy = field(default_factory=lambda: RankPolicy(keep=0.5))
    method: MethodOptions | None = None  # data-aware rank method and its data (None: plain SVD)
    depth: int = 2  # chain depth while in memory (export always collapses to 2 factors)
    export: ExportOptions = field(default_factory=ExportOptions)
    run: RunOptions = field(default_factory=RunOptions)
    finetune: FinetuneOptions | None = None  # fine-tune before export (--finetune-steps)
    recipe: dict | None = None  # the recipe these options came from, recorded in report.json
    ranks_file: Path | None = None  # the ranks file behind `policy.overrides` (for its notice)

    def __post_init__(self) -> None:
        check_depth(self.depth)
        if self.run.stream and not (self.data_free or self.streamed_whiten):
            raise DlncError("`stream` works without fine-tuning, with method svd or whiten")
        if self.run.stream and self.export.quant is not None:
            raise DlncError("`quantize` runs in memory; not with `stream`")

    @property
    def resolved(self) -> str:
        """The rank method that runs (svd without method options)."""
        return self.method.resolved if self.method is not None else "svd"

    @property
    def data_free(self) -> bool:
        """A method that needs no data (svd, or any registered data-free one), without
        fine-tuning: can be streamed (`stream=True`)."""
        return not methods.get(self.resolved).needs and self.finetune is None

    @property
    def streamed_whiten(self) -> bool:
        """Whitened SVD without fine-tuning: streamed (block by block) with `stream=True`."""
        return self.resolved == "whiten" and self.finetune is None
