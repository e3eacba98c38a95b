"""`dlnc inspect`: how compressible each layer is, from its spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.common import check_outputs, print_json, progress_bars, quiet_libraries, user_errors


def inspect(
    model: Annotated[Path, typer.Argument(help="Model folder, or a .safetensors file.")],
    include: Annotated[
        list[str] | None, typer.Option(help="Only these modules (name or re:REGEX).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Skip these modules (name or re:REGEX).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="config.json for a bare weights.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept pickle weights (.bin/.pt).")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the spectra.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON.")] = False,
) -> None:
    """Per-layer spectrum statistics: energy ranks at 0.9/0.99, effective, stable and
    numerical rank, and the break-even rank above which factorizing saves nothing."""
    from compressor.core.compress import layer_spectra
    from compressor.core.layers import dense_weight_of
    from compressor.core.stats import spectrum_stats
    from compressor.io.checkpoint import load_checkpoint
    from compressor.workflows.compress import CompressOptions, select_targets

    quiet_libraries()
    with user_errors():
        check_outputs(plot=plot)
        loaded = load_checkpoint(model, config, allow_pickle)
        options = CompressOptions(include=include or None, exclude=exclude or [])
        targets = select_targets(loaded, options)
        with progress_bars(not json_out) as progress:
            spectra = layer_spectra(targets, progress)
        stats = [
            spectrum_stats(n, tuple(dense_weight_of(targets[n]).shape), s)
            for n, s in spectra.items()
        ]
        if plot is not None:
            from cli.plots import plot_spectra

            plot_spectra(spectra, plot)
    if json_out:
        print_json({"notices": loaded.notices, "layers": [s.to_dict() for s in stats]})
        return
    console = Console()
    for notice in loaded.notices:
        console.print(f"[yellow]note:[/] {notice}")
    console.print(stats_table(stats))
    if plot is not None:
        console.print(f"wrote {plot}")


def stats_table(stats: list) -> Table:
    table = Table(title="dlnc inspect: spectrum of each targeted weight")
    cols = ("layer", "shape", "r90", "r99", "eff. rank", "stable rank", "num. rank", "break-even")
    for col in cols:
        if col == "layer":
            table.add_column(col, overflow="fold", min_width=24)
        else:
            table.add_column(col, justify="right")
    for s in stats:
        table.add_row(
            s.name,
            "x".join(map(str, s.shape)),
            str(s.energy_rank_90),
            str(s.energy_rank_99),
            f"{s.effective_rank:.1f}",
            f"{s.stable_rank:.1f}",
            str(s.numerical_rank),
            f"{s.breakeven_rank:.0f}",
        )
    return table
