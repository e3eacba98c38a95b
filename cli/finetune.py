"""`dlnc finetune` (recovery fine-tuning of a compressed model) and `dlnc eval`.

Both run unchanged on CPU, one GPU, or many processes: `accelerate launch -m cli.main finetune ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    RECIPE_FLAGS,
    is_main_process,
    print_json,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)

DataPath = Annotated[
    Path,
    typer.Option("--data", exists=True, help="Training text/JSONL/save_to_disk/.safetensors data."),
]


def finetune(
    model: Annotated[Path, typer.Argument(help="A `dlnc compress` output folder.")],
    data: DataPath,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output folder \\[default: <model>-ft].")
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(exists=True, help="The original model folder, to distil from."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps \\[recipe].")] = None,
    recipe: Annotated[
        str, typer.Option(help="auto (by model_type), a recipe name, or a .yaml file.")
    ] = "auto",
    objective: Annotated[str | None, typer.Option(help="distill | task | mix \\[recipe].")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate \\[recipe].")] = None,
    outer_lr_scale: Annotated[
        float | None, typer.Option(help="Outer factors train at this x lr (discrepant lr).")
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="Train chains of this depth L >= 2 \\[recipe].")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per batch \\[recipe].")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per sample \\[recipe].")] = None,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    warmup: Annotated[float, typer.Option(help="Warm-up share of the steps.")] = 0.05,
    clip: Annotated[float, typer.Option(help="Max gradient norm (0: off).")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 2.0,
    mix_weight: Annotated[float, typer.Option(help="mix: weight of distillation.")] = 0.5,
    trainable: Annotated[str, typer.Option(help="all | factors (only the chains).")] = "all",
    mixed_precision: Annotated[str, typer.Option(help="auto | no | fp16 | bf16.")] = "auto",
    eval_data: Annotated[
        Path | None, typer.Option(exists=True, help="Held-out data \\[default: split of --data].")
    ] = None,
    eval_fraction: Annotated[float, typer.Option(help="Held-out share of --data.")] = 0.1,
    samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL/dataset text field.")] = "text",
    label_field: Annotated[str | None, typer.Option(help="Field with labels.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint the state every K steps.")] = 0,
    state_dir: Annotated[
        Path | None, typer.Option(help="Training-state folder \\[default: <out>.state].")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of shuffling, dropout, masking.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fine-tune a compressed model to win back the quality it lost.

    Distils from --teacher (KL on logits, or MSE on hidden states for encoders) and/or trains
    on the task, then exports (chains collapse to two factors). Ctrl-C saves a resumable
    state; --resume continues it. Many GPUs: accelerate launch -m cli.main finetune ...
    """
    from compressor.recipes.schema import apply_overrides, choose_recipe
    from compressor.workflows.finetune import finetune_checkpoint
    from compressor.workflows.options import recovery_options

    quiet_libraries()
    out = out or model.parent / f"{model.name}-ft"
    with user_errors("finetune"):
        chosen, _ = choose_recipe(recipe, model)
        flags = {
            "finetune.steps": steps, "finetune.objective": objective, "finetune.lr": lr,
            "chain.outer_lr_scale": outer_lr_scale, "chain.depth": depth,
            "finetune.batch_size": batch_size, "finetune.max_length": max_length,
        }  # fmt: skip
        chosen = apply_overrides(chosen, flags, {**RECIPE_FLAGS, "finetune.steps": "--steps"})
        data_kw = {"text_field": text_field, "label_field": label_field, "tokenizer": tokenizer,
                   "samples": samples, "seed": seed}  # fmt: skip
        options = recovery_options(
            chosen,
            data,
            config={
                "grad_accum": grad_accum, "warmup": warmup, "clip": clip or None,
                "objective_params": {"temperature": temperature, "mix_weight": mix_weight},
                "trainable": trainable,
                "mixed_precision": mixed_precision, "save_every": save_every, "seed": seed,
            },
            data_kw=data_kw,
            eval_data=eval_data,
            eval_fraction=eval_fraction,
            state_dir=state_dir,
            resume=resume,
        )  # fmt: skip
        with progress_bars(not json_out) as progress:
            run = finetune_checkpoint(model, out, teacher=teacher, options=options,
                                      overwrite=overwrite, progress=progress)  # fmt: skip
    if run.out_dir is None:  # not the main process
        return
    if json_out:
        print_json({"out_dir": str(run.out_dir), **run.report})
        return
    console = stdout_console()
    section = run.report["finetune"]
    console.print(f"objective: {section['objective']}")
    if section["eval"]:
        console.print(eval_table(section["eval"]))
    console.print(
        f"{section['steps']} steps in {section['seconds']:.1f} s "
        f"({section['steps_per_s']:.2f} steps/s); wrote {run.out_dir}"
    )


def evaluate(
    model: Annotated[Path, typer.Argument(help="A dlnc export or an ordinary model folder.")],
    data: Annotated[
        Path | None, typer.Option("--data", exists=True, help="Held-out data (text for --seq-len).")
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(exists=True, help="The original model, to compare with.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 8,
    max_length: Annotated[int, typer.Option(help="Tokens per sample.")] = 128,
    samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL/dataset text field.")] = "text",
    label_field: Annotated[str | None, typer.Option(help="Field with labels.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer folder.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample subset and masking.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    seq_len: Annotated[
        int | None, typer.Option(help="Papers' perplexity: windows of this many tokens of --data.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="lm-eval tasks, comma-separated (names or task YAMLs).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many docs.")] = None,
) -> None:
    """Held-out loss of a model (perplexity for LMs, accuracy for classifiers).

    With --teacher, also the original's numbers and the distance from it (distillation loss;
    embedding cosine for encoders). With --seq-len, perplexity as papers report it (the whole
    --data text in non-overlapping windows); with --tasks, lm-evaluation-harness tasks.
    """
    if seq_len is not None or tasks:
        from cli.standard_eval import standard_eval

        standard_eval(model, data, seq_len, tasks, limit, batch_size, tokenizer, json_out)
        return
    if data is None:
        from cli.common import fail

        fail("--data is needed (or --seq-len with --data, or --tasks)")
    from compressor.training.data import load_samples, load_tokenizer, make_batches
    from compressor.training.evaluate import evaluate as run_eval
    from compressor.workflows.finetune import load_model

    quiet_libraries()
    with user_errors("eval"):
        loaded = load_samples(data, text_field, label_field, samples, seed)
        tok = load_tokenizer(model, tokenizer) if loaded.is_text else None
        batches = make_batches(loaded, tok, max_length, batch_size)
        original = load_model(teacher) if teacher is not None else None
        mask_id = getattr(tok, "mask_token_id", None)
        metrics = {}
        if original is not None:
            metrics["original"] = run_eval(original, batches, original, mask_token_id=mask_id,
                                           seed=seed)  # fmt: skip
        metrics["model"] = run_eval(load_model(model), batches, original, mask_token_id=mask_id,
                                    seed=seed)  # fmt: skip
    if not is_main_process():
        return
    rows = {k: v.to_dict() for k, v in metrics.items()}
    if json_out:
        print_json(rows)
        return
    stdout_console().print(eval_table(rows))


def eval_table(rows: dict[str, dict]) -> Table:
    """One row per model (original / before / after): the metrics that apply."""
    names = ("loss", "perplexity", "accuracy", "distill", "cosine")
    shown = [n for n in names if any(r.get(n) is not None for r in rows.values())]
    table = Table(title="held-out evaluation")
    table.add_column("model")
    for name in shown:
        table.add_column(name, justify="right")
    table.add_column("samples", justify="right")
    for label, r in rows.items():
        cells = ["-" if r.get(n) is None else f"{r[n]:.4g}" for n in shown]
        table.add_row(label, *cells, str(r["samples"]))
    return table
