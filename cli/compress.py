"""`dlnc compress`: a checkpoint in, a slimmer checkpoint out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import (
    as_flags,
    check_outputs,
    fail,
    human_bytes,
    human_count,
    print_json,
    print_notes,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.flags import (
    BUDGET,
    CALIBRATION_DATA,
    DATA,
    EXPORT,
    LOAD,
    METHOD,
    RECIPE_FLAGS,
    RUN,
    TARGETS,
    JsonOut,
    LogEvery,
    Plot,
    Quiet,
    recipe_given,
    with_flags,
)

Out = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output folder \\[default: <input>-dlnc beside the input]."),
]
RecipeSpec = Annotated[
    str,
    typer.Option(
        help="Defaults for the model family: auto (by config.json's model_type), a shipped "
        "name (dlnc recipes list) or a .yaml file. Flags given here override its values."
    ),
]
FinetuneSteps = Annotated[
    int | None,
    typer.Option(help="Fine-tune this many steps before export, distilling from the input."),
]
FinetuneData = Annotated[
    Path | None, typer.Option(exists=True, help="Fine-tuning data (with --finetune-steps).")
]
Resume = Annotated[
    bool,
    typer.Option(
        help="With --finetune-steps: continue an interrupted fine-tuning from <out>.state "
        "(give the same flags again)."
    ),
]
RanksFile = Annotated[
    Path | None, typer.Option(help="Per-layer ranks from `dlnc estimate-ranks --save`.")
]


@with_flags(BUDGET, TARGETS, LOAD, EXPORT, RUN, METHOD, DATA)
def compress(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model folder, a .safetensors file, or a Hub name (org/name) in the local cache."
        ),
    ],
    out: Out = None,
    recipe: RecipeSpec = "auto",
    plot: Plot = None,
    finetune_steps: FinetuneSteps = None,
    finetune_data: FinetuneData = None,
    resume: Resume = False,
    data: CALIBRATION_DATA = None,
    ranks: RanksFile = None,
    json_out: JsonOut = False,
    log_every: LogEvery = 10,
    quiet: Quiet = False,
    *,
    budget: dict,
    targets: dict,
    load: dict,
    export: dict,
    run: dict,
    rank_method: dict,
    batches: dict,
) -> None:
    """Factorize the model's dense layers (spectral initialization) and export a slimmer checkpoint.

    Ratios: --keep is a fraction of the weight parameters of the *targeted* layers only
    (embeddings, heads and norms are untouched); --energy is per layer.
    """
    from compressor.options import ExportOptions, LoadOptions, RunOptions
    from compressor.workflows.compress import compress_checkpoint
    from compressor.workflows.options import recipe_options

    quiet_libraries()
    with user_errors("compress"):
        check_outputs(plot=plot)
        if budget["keep"] is not None and export["bits_per_weight"] is not None:
            fail("--keep and --bits-per-weight both set the budget; give one")
        merge = export.pop("merge")
        options, _ = recipe_options(
            recipe, model, recipe_given(**budget, **targets, finetune_steps=finetune_steps),
            RECIPE_FLAGS, load=LoadOptions(**load), method=rank_method,
            data={"path": data, **batches}, run=RunOptions(**run),
            export=ExportOptions(format="dense" if merge else "factors", **export),
            ranks_file=ranks, finetune_data=finetune_data, resume=resume,
        )  # fmt: skip
        with progress_bars(not (json_out or quiet), log_every) as progress:
            result = compress_checkpoint(model, out, options, progress)
        from cli.plots import write_loss_plot

        write_loss_plot(result.report, result.out_dir)
        if plot is not None:
            from cli.plots import plot_spectra

            chosen = {r["name"]: r["rank"] for r in result.report["layers"]}
            plot_spectra(result.spectra, plot, chosen)
    if json_out:
        print_json({"out_dir": str(result.out_dir), **result.report})
        return
    print_report(result, plot, quiet)


def print_report(result, plot: Path | None, quiet: bool = False) -> None:
    """The recipe, the notices, the per-layer and total tables, and what was written
    (`quiet`: without the recipe line and the notes)."""
    print_recipe(result.report["recipe"], quiet)
    console = stdout_console()
    if not quiet:
        print_notes(result.notices, "compress", console)
    console.print(layer_table(result.report))
    console.print(totals_table(result.report))
    speed = result.report.get("expected_speed")
    if speed and not quiet:
        console.print(f"layer time: the targeted layers' expected time over dense, from matmul "
                      f"timings on {speed['device']}")  # fmt: skip
    console.print(f"wrote {result.out_dir}" + (f" and {plot}" if plot else ""))


def print_recipe(record: dict, quiet: bool = False) -> None:
    """Which recipe was used (not when `quiet`), and the fallback warning (with --json: in
    the report only)."""
    console = Console(soft_wrap=True, highlight=False)  # a path stays whole, copyable
    if not quiet:
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
    speed = report.get("expected_speed")
    for key, speedup in (speed or {}).get("speedup", {}).items():
        rows = int(key.removeprefix("rows_"))
        label = f"layer time, {rows} row{'s' if rows > 1 else ''} (expected)"
        table.add_row(label, "", "", f"{1 / speedup:.3f}")
    ppl = report.get("perplexity")
    if ppl is not None:
        stages = (("after", "perplexity"), ("after_finetune", "after fine-tuning"),
                  ("after_quantize", "after quantization"))  # fmt: skip
        for stage, label in stages:
            if stage in ppl:
                before, after = ppl["before"], ppl[stage]
                table.add_row(label, f"{before:.2f}", f"{after:.2f}", f"{after / before:.3f}")
    return table
