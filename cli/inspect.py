"""`dlnc inspect`: how compressible each layer is, from its spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    check_outputs,
    print_json,
    print_notes,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.flags import LOAD, RECIPE_FLAGS, TARGETS, JsonOut, Plot, Quiet, recipe_given, with_flags

RecipeSpec = Annotated[
    str,
    typer.Option(
        help="Targets as `dlnc compress` uses them: auto (by model_type), a shipped name or a "
        ".yaml file (a dlnc export: its factorized layers)."
    ),
]


@with_flags(TARGETS, LOAD)
def inspect(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model folder, a .safetensors file, or a Hub name (org/name) in the local cache."
        ),
    ],
    recipe: RecipeSpec = "auto",
    plot: Plot = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    *,
    targets: dict,
    load: dict,
) -> None:
    """Per-layer spectrum statistics: energy ranks at 0.9/0.99, effective, stable and
    numerical rank, and the break-even rank above which factorizing saves nothing."""
    from compressor.options import LoadOptions
    from compressor.workflows.inspect import inspect_checkpoint
    from compressor.workflows.options import inspect_options

    quiet_libraries()
    with user_errors("inspect"):
        check_outputs(plot=plot)
        given = recipe_given(**targets)
        options = inspect_options(recipe, model, given, RECIPE_FLAGS, LoadOptions(**load))
        with progress_bars(not (json_out or quiet)) as progress:
            found = inspect_checkpoint(model, options, progress)
        if plot is not None:
            from cli.plots import plot_spectra

            plot_spectra(found.spectra, plot, found.ranks)
    if json_out:
        print_json({"notices": found.notices, "layers": found.rows})
        return
    console = stdout_console()
    if not quiet:
        print_notes(found.notices, "inspect", console)
    console.print(stats_table(found.rows))
    if plot is not None:
        console.print(f"wrote {plot}")


def stats_table(rows: list[dict]) -> Table:
    """One row per layer; a `rank` column for the factorized layers of an export."""
    table = Table(title="dlnc inspect: spectrum of each targeted weight")
    keys = {"layer": "name", "shape": "shape", "rank": "rank", "r90": "energy_rank_90",
            "r99": "energy_rank_99", "eff. rank": "effective_rank",
            "stable rank": "stable_rank", "num. rank": "numerical_rank",
            "break-even": "breakeven_rank"}  # fmt: skip
    if not any("rank" in r for r in rows):
        del keys["rank"]
    for col in keys:
        if col == "layer":
            table.add_column(col, overflow="fold", min_width=24)
        else:
            table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(_cell(key, r[key]) for key in keys.values()))
    return table


FORMATS = {"effective_rank": "{:.1f}", "stable_rank": "{:.1f}", "breakeven_rank": "{:.0f}"}


def _cell(key: str, value: object) -> str:
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    return FORMATS.get(key, "{}").format(value)
