"""`dlnc finetune`: recovery fine-tuning of a compressed model.

It runs unchanged on CPU, one GPU, or many processes (`LAUNCH`, as the README says).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    print_json,
    print_notes,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.evaluate import eval_table
from cli.flags import (
    DATA,
    RECIPE_FLAGS,
    TRAINING,
    JsonOut,
    LogEvery,
    Quiet,
    recipe_given,
    with_flags,
)

DataPath = Annotated[
    Path,
    typer.Option("--data", exists=True, help="Training text/JSONL/save_to_disk/.safetensors data."),
]
RECIPE_VALUES = {
    "steps": (Annotated[int | None, typer.Option(help="Optimizer steps \\[recipe].")], None),
    "objective": (Annotated[str | None, typer.Option(help="distill | task | mix \\[recipe].")],
                  None),
    "lr": (Annotated[float | None, typer.Option(help="Peak learning rate \\[recipe].")], None),
    "temperature": (Annotated[float | None, typer.Option(
        help="Distillation temperature on logits \\[recipe].")], None),
    "mix_weight": (Annotated[float | None, typer.Option(
        help="mix: weight of the distillation term \\[recipe].")], None),
    "outer_lr_scale": (Annotated[float | None, typer.Option(
        help="Outer factors train at this x lr (discrepant lr).")], None),
    "depth": (Annotated[int | None, typer.Option(
        help="Train chains of this depth L >= 2 \\[recipe].")], None),
}  # fmt: skip
LAUNCH = 'accelerate launch --multi_gpu --num_processes 4 "$(which dlnc)" finetune ...'
"""How to run `dlnc finetune` on several GPUs (the README and the help say this same line)."""
FINETUNE_DATA = DATA.defaults(batch_size=None, max_length=None, samples=None)
"""Batch size and max length default to the recipe's (`finetune` section)."""


@with_flags(TRAINING.plus(**RECIPE_VALUES), FINETUNE_DATA)
def finetune(
    model: Annotated[Path, typer.Argument(help="A `dlnc compress` output folder.")],
    data: DataPath,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder \\[default: <model>-ft].")
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(help="The original model folder, to distil from."),
    ] = None,
    recipe: Annotated[
        str, typer.Option(help="auto (by model_type), a recipe name, or a .yaml file.")
    ] = "auto",
    eval_data: Annotated[
        Path | None, typer.Option(exists=True, help="Held-out data \\[default: split of --data].")
    ] = None,
    eval_fraction: Annotated[float, typer.Option(help="Held-out share of --data.")] = 0.1,
    state_dir: Annotated[
        Path | None, typer.Option(help="Training-state folder \\[default: <out>.state].")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    json_out: JsonOut = False,
    log_every: LogEvery = 10,
    quiet: Quiet = False,
    *,
    training: dict,
    batches: dict,
) -> None:
    """Fine-tune a compressed model to win back the quality it lost.

    Distils from --teacher (KL on logits, or MSE on hidden states for encoders) and/or trains
    on the task, then exports (chains collapse to two factors). Ctrl-C saves a resumable
    state; --resume continues it. Writes report.json (the loss and lr of every step) and
    loss.png beside the export. Several GPUs: accelerate launch --multi_gpu --num_processes 4
    "$(which dlnc)" finetune ...
    """
    from compressor.workflows.finetune import finetune_checkpoint
    from compressor.workflows.options import recipe_finetune_options

    quiet_libraries()
    out = out or model.parent / f"{model.name}-ft"
    with user_errors("finetune"):
        given = recipe_given(**{n: training.pop(n) for n in RECIPE_VALUES},
                             batch_size=batches.pop("batch_size"),
                             max_length=batches.pop("max_length"))  # fmt: skip
        training["clip"] = training["clip"] or None
        trackers = training.pop("report_to") or ""
        training["report_to"] = tuple(t.strip() for t in trackers.split(",") if t.strip())
        options, _ = recipe_finetune_options(
            recipe, model, given, {**RECIPE_FLAGS, "finetune.steps": "--steps"}, data=data,
            config={**training, "seed": batches["seed"]}, data_kw=batches, eval_data=eval_data,
            eval_fraction=eval_fraction, state_dir=state_dir, resume=resume,
        )  # fmt: skip
        with progress_bars(not (json_out or quiet), log_every) as progress:
            run = finetune_checkpoint(model, out, teacher=teacher, options=options,
                                      overwrite=overwrite, progress=progress)  # fmt: skip
        if run.out_dir is not None:
            from cli.plots import write_loss_plot

            write_loss_plot(run.report, run.out_dir)
    if run.out_dir is not None:  # the main process
        print_run(run, json_out, quiet)


def print_run(run, json_out: bool, quiet: bool) -> None:
    """The notes (not when `quiet`), then the report as JSON, or the held-out table and what
    was written."""
    notices = [] if quiet else run.notices
    if json_out:
        print_notes(notices, "finetune")  # on stderr: stdout is the JSON
        print_json({"out_dir": str(run.out_dir), **run.report})
        return
    console = stdout_console()
    print_notes(notices, "finetune", console)
    section = run.report["finetune"]
    console.print(f"objective: {section['objective']}")
    if section["eval"]:
        console.print(eval_table(section["eval"]))
    console.print(
        f"{section['steps']} steps in {section['seconds']:.1f} s "
        f"({section['steps_per_s']:.2f} steps/s); wrote {run.out_dir}"
    )
    if section.get("logs"):
        console.print(f"tracker logs: {section['logs']}", soft_wrap=True)
