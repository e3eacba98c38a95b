"""`dlnc inspect`: how compressible each layer is, from its spectrum."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    check_outputs,
    print_json,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)


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
    from compressor.io.section import is_export

    quiet_libraries()
    with user_errors("inspect"):
        check_outputs(plot=plot)
        exported = model.is_dir() and is_export(model)
        if exported:
            targets, notices = factor_targets(model, include or None, exclude or [])
        else:
            targets, notices = dense_targets(model, include, exclude, config, allow_pickle)
        with progress_bars(not json_out) as progress:
            spectra = layer_spectra(targets, progress)
        stats = [
            spectrum_stats(n, tuple(dense_weight_of(targets[n]).shape), s)
            for n, s in spectra.items()
        ]
        ranks = {n: m.rank for n, m in targets.items()} if exported else None
        if plot is not None:
            from cli.plots import plot_spectra

            plot_spectra(spectra, plot, ranks)
    rows = [{**s.to_dict(), **({"rank": ranks[s.name]} if ranks else {})} for s in stats]
    if json_out:
        print_json({"notices": notices, "layers": rows})
        return
    console = stdout_console()
    for notice in notices:
        console.print(f"[yellow]note:[/] {notice}")
    console.print(stats_table(rows))
    if plot is not None:
        console.print(f"wrote {plot}")


def dense_targets(model: Path, include, exclude, config, allow_pickle) -> tuple[dict, list[str]]:
    """The dense layers of a checkpoint that compress would target."""
    from compressor.io.checkpoint import load_checkpoint
    from compressor.workflows.compress import CompressOptions, select_targets

    loaded = load_checkpoint(model, config, allow_pickle)
    options = CompressOptions(include=include or None, exclude=exclude or [])
    return select_targets(loaded, options), loaded.notices


def factor_targets(model: Path, include, exclude) -> tuple[dict, list[str]]:
    """The factorized layers of a dlnc export (their spectra are those of up @ down)."""
    from compressor.core.surgery import factorized_layers
    from compressor.core.targets import matches
    from compressor.errors import DlncError
    from compressor.io.load import load_pretrained
    from compressor.workflows.compress import CompressOptions, check_patterns

    loaded = load_pretrained(model)
    check_patterns(loaded, CompressOptions(include=include, exclude=exclude))
    layers = {
        n: m
        for n, m in factorized_layers(loaded).items()
        if (include is None or any(matches(n, p) for p in include))
        and not any(matches(n, p) for p in exclude)
    }
    if not layers:
        raise DlncError(f"{model}: a dlnc export with no factorized layer to inspect")
    return layers, [f"{model} is a dlnc export: the spectra are those of its factors up @ down"]


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
