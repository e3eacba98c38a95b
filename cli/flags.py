"""The flags every command shares, declared once, in groups by stage (load, targets, rank
budget, rank method, data, export, run, fine-tuning), and `with_flags`, which gives a command
a group as one argument: a dict of the values given (Typer still sees every flag).

    @with_flags(LOAD, TARGETS)
    def inspect(model: Path, *, load: dict, targets: dict) -> None: ...

A command that needs another default for a shared flag says so (`DATA.defaults(samples=None)`);
one that takes only some flags of a group picks them (`BUDGET.only("keep")`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "BUDGET",
    "CALIBRATION_DATA",
    "DATA",
    "EXPORT",
    "LOAD",
    "METHOD",
    "RUN",
    "TARGETS",
    "TRAINING",
    "FlagGroup",
    "JsonOut",
    "LogEvery",
    "Plot",
    "Quiet",
    "with_flags",
]


@dataclass(frozen=True)
class FlagGroup:
    """Flags that travel together: name -> (Annotated type, default)."""

    name: str  # the command's argument that receives the group's values
    flags: dict[str, tuple[Any, Any]]

    def only(self, *names: str) -> FlagGroup:
        """The group with these flags only."""
        return FlagGroup(self.name, {n: self.flags[n] for n in names})

    def defaults(self, **values: Any) -> FlagGroup:
        """The group with other defaults for some flags."""
        return FlagGroup(self.name, {n: (t, values.get(n, d)) for n, (t, d) in self.flags.items()})

    def plus(self, **flags: tuple[Any, Any]) -> FlagGroup:
        """The group with more flags (a command's own, given to it inside the group)."""
        return FlagGroup(self.name, {**self.flags, **flags})


def with_flags(*groups: FlagGroup) -> Callable[[Callable], Callable]:
    """Declare `groups`' flags on a Typer command and pass each group as one dict argument."""

    def wrap(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in {g.name for g in groups}]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=value)
            for group in groups
            for name, (kind, value) in group.flags.items()
        ]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group in groups:
                values[group.name] = {n: values.pop(n) for n in group.flags}
            return command(**values)

        del run.__wrapped__  # Typer reads the signature below, not the command's
        parameters = own + added
        run.__signature__ = signature.replace(parameters=parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap


def _option(kind: Any, help: str, *decls: str, **kw: Any) -> Any:
    return Annotated[kind, typer.Option(*decls, help=help, **kw)]


JsonOut = _option(bool, "Print the result as JSON.", "--json")
LogEvery = _option(
    int,
    "Where no progress bar can be drawn (stderr not a terminal: a log file, SLURM, CI), "
    "write a line with the loss, lr and steps/s every N steps (0: none).",
)
Quiet = _option(
    bool, "No progress bars, per-step lines or notes; the result and errors only.", "--quiet", "-q"
)
Plot = _option(Path | None, "Write a PNG of the spectra (and the chosen ranks).")

LOAD = FlagGroup("load", {
    "config": (_option(Path | None, "config.json for a bare weights file."), None),
    "allow_pickle": (_option(bool, "Accept pickle weights (.bin/.pt); only from a trusted "
                             "source."), False),
    "trust_remote_code": (_option(bool, "Allow the checkpoint's own Python code to run."), False),
    "tensor_mode": (_option(bool, "Ignore config.json; compress the 2-D weights directly."), False),
    "revision": (_option(str | None, "With a Hub name (org/name, read offline from the "
                         "local Hugging Face cache): its branch, tag or commit."), None),
})  # fmt: skip

TARGETS = FlagGroup("targets", {
    "include": (_option(list[str] | None, "Only these modules (name or re:REGEX); replaces the "
                        "recipe's."), None),
    "exclude": (_option(list[str] | None, "Leave these modules alone (name or re:REGEX); replaces "
                        "the recipe's."), None),
})  # fmt: skip

BUDGET = FlagGroup("budget", {
    "keep": (_option(float | None, "Fraction of the targeted layers' weight parameters to keep, "
                     "in (0, 1); allocated across layers by their spectra. \\[default: from the "
                     "recipe]"), None),
    "energy": (_option(float | None, "Per layer, keep this fraction of the spectral energy sum "
                       "s_i^2."), None),
    "rank": (_option(int | None, "One rank for every targeted layer."), None),
    "multiple": (_option(int | None, "Round ranks to a multiple of this. \\[default: from the "
                         "recipe]"), None),
    "speed": (_option(str | None, "smallest (ranks for the budget alone) or never-slower (no "
                      "factorized layer slower than the dense one on this device: above the "
                      "rank where it stops being faster a layer stays dense; timed once per "
                      "device, cached). \\[default: from the recipe]"), None),
    "depth": (_option(int | None, "Chain depth L >= 2 (export collapses to 2). \\[default: from "
                      "the recipe]"), None),
})  # fmt: skip

METHOD = FlagGroup("rank_method", {
    "method": (_option(str | None,
        "Rank method: svd (data-free), whiten (activation-aware, needs --data), dynamics "
        "(needs --reference, or --warmup-steps with --data), or auto. \\[default: the recipe's; "
        "auto: whiten with --data, dynamics with --reference, else svd]"), None),
    "reference": (_option(Path | None, "The checkpoint this model was trained or fine-tuned from "
                          "(dynamics)."), None),
    "warmup_steps": (_option(int, "Dynamics: train a copy K steps on --data with the model's "
                             "objective."), 0),
    "warmup_lr": (_option(float, "Learning rate of the warm-up run (AdamW)."), 1e-4),
    "output_aware": (_option(bool,
        "With --data: share --keep by each layer's measured effect on the model's output "
        "(one backward pass per batch). --no-output-aware: by each layer's own spectrum."), True),
    "correct": (_option(bool | None,
        "With --data: refit each layer's factors block by block on the inputs the "
        "compressed layers before it produce (error-correcting calibration; a layer with "
        "under 16 calibration tokens per input feature keeps its one-shot factors). "
        "\\[default: the recipe's; on, except llama: its small gain there costs half again "
        "the run's time]"), None),
    "generate": (_option(bool,
        "Without --data: a causal language model calibrates on 32 x 256 tokens of text it "
        "generates itself (seeded, cached; about a minute on a CPU for 135M parameters), a "
        "text encoder on 64 x 128 random word pieces framed by its tokenizer's [CLS] ... "
        "[SEP]. --no-generate: ranks and factors from the weights alone."), True),
})  # fmt: skip

DATA = FlagGroup("batches", {
    "text_field": (_option(str, "JSONL / dataset field holding the text."), "text"),
    "label_field": (_option(str | None, "Field holding a label (classification)."), None),
    "tokenizer": (_option(Path | None, "Tokenizer folder \\[default: the model's folder]."), None),
    "max_length": (_option(int | None, "Tokens per sample (longer ones are truncated)."), 128),
    "samples": (_option(int | None, "Use at most N samples (a seeded subset)."), 256),
    "seed": (_option(int, "Seed of the subset, shuffling, dropout, masking and the warm-up "
                      "run."), 0),
    "batch_size": (_option(int | None, "Samples per batch."), 8),
})  # fmt: skip
"""How data files become batches; `path` (--data) is each command's own: its help differs."""

CALIBRATION_DATA = _option(
    Path | None,
    "Calibration data: a text file (a sample per line, or blank-line separated), JSONL, a "
    "save_to_disk folder, or a .safetensors file of input tensors.",
    "--data",
)

EXPORT = FlagGroup("export", {
    "merge": (_option(bool, "Export dense weights, loadable by any tool."), False),
    "overwrite": (_option(bool, "Replace an existing output folder."), False),
    "max_shard_size": (_option(str, "Shard exported weights above this."), "2GB"),
    "quantize": (_option(str | None, "int8 | int4: store the targeted layers' weights (factors "
                         "and layers left dense) as integer codes; GPTQ on the calibration "
                         "data, else round to nearest."), None),
    "group_size": (_option(int | None, "With --quantize: inputs sharing one scale (0: a whole "
                           "row). \\[default: int8 a row, int4 64]"), None),
    "bits_per_weight": (_option(float | None, "With --quantize: a budget of stored bits a "
                                "weight over the quantized layers; sets --keep."), None),
})  # fmt: skip

RUN = FlagGroup("run", {
    "stream": (_option(bool | None,
        "Read and write one tensor at a time (memory: a layer, not the model); with --method "
        "whiten, calibrate block by block. Without fine-tuning only. \\[default: on without "
        "data when the model would not fit in memory]"), None),
    "device": (_option(str | None, "Where the linear algebra runs (cpu, cuda, cuda:1). "
                       "\\[default: GPU if any]"), None),
})  # fmt: skip

TRAINING = FlagGroup("training", {
    "grad_accum": (_option(int, "Batches per optimizer step."), 1),
    "warmup": (_option(float, "Warm-up share of the steps."), 0.05),
    "clip": (_option(float, "Max gradient norm (0: off)."), 1.0),
    "trainable": (_option(str, "all | factors (only the chains)."), "all"),
    "mixed_precision": (_option(str, "auto | no | fp16 | bf16."), "auto"),
    "save_every": (_option(int, "Checkpoint the state every K steps."), 0),
    "report_to": (_option(str | None, "Log each step's loss and lr to these trackers, "
                          "comma-separated (accelerate's: tensorboard, wandb, mlflow, ...), "
                          "under <state-dir>/logs."), None),
})  # fmt: skip
"""The fine-tuning run's settings a recipe does not hold."""

RECIPE_KEYS = {
    "include": "targets.include",
    "exclude": "targets.exclude",
    "keep": "ranks.keep",
    "energy": "ranks.energy",
    "rank": "ranks.rank",
    "multiple": "ranks.multiple",
    "speed": "ranks.speed",
    "depth": "chain.depth",
    "outer_lr_scale": "chain.outer_lr_scale",
    "objective": "finetune.objective",
    "temperature": "finetune.temperature",
    "mix_weight": "finetune.mix_weight",
    "lr": "finetune.lr",
    "steps": "finetune.steps",
    "finetune_steps": "finetune.steps",
    "batch_size": "finetune.batch_size",
    "max_length": "finetune.max_length",
}
"""The recipe key each flag overrides (by parameter name)."""

RECIPE_FLAGS = {key: "--" + name.replace("_", "-") for name, key in RECIPE_KEYS.items()}
"""The flag that overrides each recipe key, for messages about a value given on the command
line (`finetune.steps`: compress's --finetune-steps; `dlnc finetune` says --steps)."""


def recipe_given(**values: Any) -> dict[str, Any]:
    """The given flags as recipe keys (None, or an empty list: not given)."""
    return {RECIPE_KEYS[name]: value or None if isinstance(value, list) else value
            for name, value in values.items()}  # fmt: skip
