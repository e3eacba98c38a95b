"""`dlnc demo`: the whole pipeline on an embedded default (digits, scikit-learn's data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import progress_bars, quiet_libraries, stdout_console, user_errors


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the checkpoints and the report.")
    ] = Path("dlnc-demo"),
    fast: Annotated[bool, typer.Option(help="A smaller setting (seconds, for tests).")] = False,
) -> None:
    """Train a wide network on handwritten digits, then inspect, estimate ranks from a warm-up
    run, compress, fine-tune, export, reload and evaluate it: the whole product, offline."""
    from cli.plots import plot_report
    from compressor.workflows.demo import DemoSettings, run_demo

    quiet_libraries()
    console = stdout_console()
    settings = DemoSettings.fast() if fast else DemoSettings()
    console.print(
        f"dlnc demo: a {settings.width}-wide MLP on scikit-learn's digits, compressed to "
        f"keep {settings.keep:.0%} of its targeted weights (depth-{settings.depth} chains)"
    )
    with user_errors():
        with progress_bars() as progress:
            result = run_demo(out, settings, progress)
        png = result.out_dir / "report.png"
        stages = {"wide": result.wide_accuracy, "compressed": result.compressed_accuracy,
                  "fine-tuned": result.finetuned_accuracy}  # fmt: skip
        plot_report(
            result.spectra, result.ranks, result.losses, png, "dlnc demo: digits MLP", stages
        )
    console.print(_ranks_table(result))
    console.print(_before_after(result))
    console.print(f"checkpoints: {result.out_dir / 'wide'} -> {result.out_dir / 'compressed'}")
    console.print(f"report: {png}")


def _ranks_table(result) -> Table:
    table = Table(
        title="ranks: the weight W's spectrum vs the warm-up update dW's",
        caption="r90: rank keeping 90% of the energy; at or above break-even a layer stays dense",
    )
    cols = ("layer", "shape", "W eff. rank", "W r90", "dW r90", "chosen", "break-even")
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in result.layers:
        table.add_row(
            row["name"],
            "x".join(map(str, row["shape"])),
            f"{row['weight_effective_rank']:.0f}",
            str(row["weight_r90"]),
            str(row["update_r90"]),
            "dense" if row["rank"] is None else str(row["rank"]),
            f"{row['breakeven']:.0f}",
        )
    return table


def _before_after(result) -> Table:
    table = Table(title="wide / compressed / fine-tuned")
    for col in ("", "wide", "compressed", "fine-tuned"):
        table.add_column(col, justify="right")
    for row in result.rows:
        table.add_row(*row)
    return table
