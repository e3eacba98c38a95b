"""`dlnc compress`: a checkpoint in, a slimmer checkpoint out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli import aware as opt
from cli.common import (
    RECIPE_FLAGS,
    as_flags,
    check_outputs,
    human_bytes,
    human_count,
    print_json,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)


def compress(
    model: Annotated[Path, typer.Argument(help="Model folder, or a .safetensors file.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output folder \\[default: <input>-dlnc beside the input]."
        ),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="Defaults for the model family: auto (by config.json's model_type), a shipped "
            "name (dlnc recipes list) or a .yaml file. Flags given here override its values."
        ),
    ] = "auto",
    keep: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the targeted layers' weight parameters to keep, in (0, 1); "
            "allocated across layers by their spectra. \\[default: from the recipe]"
        ),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option(help="Per layer, keep this fraction of the spectral energy sum s_i^2."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="One rank for every targeted layer.")] = None,
    depth: Annotated[
        int | None,
        typer.Option(
            help="Chain depth L >= 2 (export collapses to 2). \\[default: from the recipe]"
        ),
    ] = None,
    multiple: Annotated[
        int | None,
        typer.Option(help="Round ranks to a multiple of this. \\[default: from the recipe]"),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(help="Compress only these modules (name or re:REGEX); replaces the recipe's."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Leave these modules alone (name or re:REGEX); replaces the recipe's."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="config.json for a bare weights file.")
    ] = None,
    merge: Annotated[
        bool, typer.Option(help="Export dense weights, loadable by any tool.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    stream: Annotated[
        bool | None,
        typer.Option(
            help="Read and write one tensor at a time (memory: a layer, not the model); with "
            "--method whiten, calibrate block by block. Without fine-tuning only. "
            "\\[default: on without data when the model would not fit in memory]"
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="Device of the streamed SVDs (cpu, cuda, cuda:1). \\[default: GPU if any]"
        ),
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept pickle weights (.bin/.pt); only from a trusted source.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the checkpoint's own Python code to run.")
    ] = False,
    tensor_mode: Annotated[
        bool, typer.Option(help="Ignore config.json; compress the 2-D weights directly.")
    ] = False,
    max_shard_size: Annotated[str, typer.Option(help="Shard exported weights above this.")] = "2GB",
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of the spectra and chosen ranks.")
    ] = None,
    finetune_steps: Annotated[
        int | None,
        typer.Option(help="Fine-tune this many steps before export, distilling from the input."),
    ] = None,
    finetune_data: Annotated[
        Path | None, typer.Option(exists=True, help="Fine-tuning data (with --finetune-steps).")
    ] = None,
    method: opt.Method = None,
    data: opt.Data = None,
    text_field: opt.TextField = "text",
    label_field: opt.LabelField = None,
    tokenizer: opt.Tokenizer = None,
    max_length: opt.MaxLength = 128,
    samples: opt.Samples = 256,
    seed: opt.Seed = 0,
    batch_size: opt.BatchSize = 8,
    reference: opt.Reference = None,
    warmup_steps: opt.WarmupSteps = 0,
    warmup_lr: opt.WarmupLr = 1e-4,
    output_aware: opt.OutputAware = True,
    correct: opt.Correct = True,
    ranks: Annotated[
        Path | None, typer.Option(help="Per-layer ranks from `dlnc estimate-ranks --save`.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Factorize the model's dense layers (spectral initialization) and export a slimmer checkpoint.

    Ratios: --keep is a fraction of the weight parameters of the *targeted* layers only
    (embeddings, heads and norms are untouched); --energy is per layer.
    """
    from compressor.workflows.compress import compress_checkpoint
    from compressor.workflows.options import apply_ranks_file, recipe_options, recovery_options

    quiet_libraries()
    with user_errors("compress"):
        check_outputs(plot=plot)
        flags = {
            "ranks.keep": keep,
            "ranks.energy": energy,
            "ranks.rank": rank,
            "ranks.multiple": multiple,
            "chain.depth": depth,
            "targets.include": include or None,
            "targets.exclude": exclude or None,
            "finetune.steps": finetune_steps,
        }
        options, chosen = recipe_options(
            recipe,
            model,
            flags,
            RECIPE_FLAGS,
            config=config,
            tensor_mode=tensor_mode,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            merge=merge,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            stream=stream,
            device=device,
        )
        options.aware = opt.aware_options(
            chosen, method, data, text_field, label_field, tokenizer, max_length,
            samples, seed, batch_size, reference, warmup_steps, warmup_lr, output_aware,
            correct,
        )  # fmt: skip
        if ranks is not None:
            apply_ranks_file(options, ranks)
        if finetune_steps is not None:
            options.finetune = recovery_options(chosen, finetune_data)
        with progress_bars(not json_out) as progress:
            result = compress_checkpoint(model, out, options, progress)
        if plot is not None:
            from cli.plots import plot_spectra

            ranks = {r["name"]: r["rank"] for r in result.report["layers"]}
            plot_spectra(result.spectra, plot, ranks)
    if json_out:
        print_json({"out_dir": str(result.out_dir), **result.report})
        return
    print_recipe(result.report["recipe"])
    console = stdout_console()
    for notice in result.notices:
        console.print(f"[yellow]note:[/] {notice}")
    console.print(layer_table(result.report))
    console.print(totals_table(result.report))
    console.print(f"wrote {result.out_dir}" + (f" and {plot}" if plot else ""))


def print_recipe(record: dict) -> None:
    """Which recipe was used, and the fallback warning (with --json: in the report only)."""
    console = Console(soft_wrap=True, highlight=False)  # a path stays whole, copyable
    console.print(f"recipe: {record['name']} ({record['picked_by']}: {record['path']})")
    if record["warning"]:
        console.print(f"[yellow]warning:[/] {as_flags(record['warning'], 'compress')}")


def layer_table(report: dict) -> Table:
    table = Table(title=f"dlnc compress ({report['method']}, depth {report['depth']})")
    cols = ("layer", "shape", "rank", "break-even", "params before", "params after", "rel error")
    for col in cols:
        if col == "layer":
            table.add_column(col, overflow="fold", min_width=24)
        else:
            table.add_column(col, justify="right")
    for r in report["layers"]:
        rank = "dense" if r["rank"] is None else str(r["rank"])
        table.add_row(
            r["name"],
            "x".join(map(str, r["shape"])),
            rank,
            f"{r['breakeven']:.0f}",
            human_count(r["params_before"]),
            human_count(r["params_after"]),
            f"{r['rel_error']:.4f}",
        )
    return table


def totals_table(report: dict) -> Table:
    table = Table(title="totals")
    for col in ("", "before", "after", "after / before"):
        table.add_column(col, justify="right")
    rows = [
        ("targeted weights", report["targeted_params_before"], report["targeted_params_after"]),
        ("model params", report["model_params_before"], report["model_params_after"]),
    ]
    for label, before, after in rows:
        table.add_row(label, human_count(before), human_count(after), f"{after / before:.3f}")
    b0, b1 = report["bytes_before"], report["bytes_after"]
    table.add_row("bytes on disk", human_bytes(b0), human_bytes(b1), f"{b1 / b0:.3f}")
    return table
