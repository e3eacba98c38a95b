"""`dlnc estimate-ranks`: per-layer ranks from the weights, the data and the dynamics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    as_flags,
    check_outputs,
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
    LOAD,
    METHOD,
    RECIPE_FLAGS,
    TARGETS,
    JsonOut,
    Plot,
    Quiet,
    recipe_given,
    with_flags,
)

Keep = BUDGET.only("keep").plus(keep=(Annotated[float | None, typer.Option(
    help="Fraction of the targeted weights the chosen ranks keep. \\[default: the recipe's]"
)], None))  # fmt: skip
RecipeSpec = Annotated[
    str,
    typer.Option(
        help="Targets and budget as `dlnc compress` uses them: auto (by model_type), a "
        "shipped name or a .yaml file."
    ),
]
Save = Annotated[
    Path | None, typer.Option(help="Write the chosen ranks to a YAML file for --ranks.")
]


@with_flags(Keep, METHOD.only("method", "reference", "warmup_steps", "warmup_lr"), DATA,
            TARGETS, LOAD)  # fmt: skip
def estimate_ranks(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model folder, a .safetensors file, or a Hub name (org/name) in the local cache."
        ),
    ],
    data: CALIBRATION_DATA = None,
    recipe: RecipeSpec = "auto",
    tau: Annotated[float, typer.Option(help="Energy fraction of the per-spectrum ranks.")] = 0.9,
    plot: Plot = None,
    save: Save = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    *,
    budget: dict,
    rank_method: dict,
    batches: dict,
    targets: dict,
    load: dict,
) -> None:
    """Estimate per-layer ranks without compressing: the energy rank (at --tau) of the weight's
    spectrum, of its activation-aware spectrum (with --data), and of its update (with
    --reference or --warmup-steps), the rank --method chooses under --keep, and break-even.

    Save the chosen ranks with --save ranks.yaml and use them with `dlnc compress --ranks`.
    """
    from compressor.io.rankfile import save_ranks
    from compressor.options import LoadOptions
    from compressor.workflows.estimate import estimate_checkpoint
    from compressor.workflows.options import recipe_options

    quiet_libraries()
    with user_errors("estimate-ranks"):
        check_outputs(plot=plot, save=save)
        options, chosen = recipe_options(
            recipe, model, recipe_given(**budget, **targets), RECIPE_FLAGS,
            load=LoadOptions(**load), method=rank_method, data={"path": data, **batches},
        )  # fmt: skip
        with progress_bars(not (json_out or quiet)) as progress:
            est = estimate_checkpoint(model, options, tau, progress)
        if plot is not None:
            from cli.plots import plot_spectra

            title = f"{est.method} spectra (s_i / s_1)"
            plot_spectra(est.spectra, plot, est.chosen, title=title)
        if save is not None:
            save_ranks(save, est.chosen, method=est.method, keep=est.policy.keep, model=str(model))
    if json_out:
        print_json({"method": est.method, "keep": est.policy.keep, "tau": tau,
                    "recipe": chosen.name, "info": asdict(est.info), "notices": est.notices,
                    "layers": [r.to_dict() for r in est.layers]})  # fmt: skip
        return
    _print(est, [p for p in (plot, save) if p], options.recipe, quiet)


def _print(est, written: list[Path], recipe: dict | None, quiet: bool = False) -> None:
    from rich.table import Table

    from compressor import methods

    budget = f"keep {est.policy.keep:g}" if est.policy.keep is not None else "recipe budget"
    title = f"dlnc estimate-ranks ({est.method}, {budget}, energy ranks at {est.tau:g})"
    table = Table(title=title)
    table.add_column("layer", overflow="fold", min_width=24)
    columns = [methods.get(n).column for n in methods.names()]
    for col in ("shape", *columns, "chosen", "break-even"):
        table.add_column(col, justify="right")
    for r in est.layers:
        table.add_row(
            r.name,
            "x".join(map(str, r.shape)),
            *("-" if r.readings.get(c) is None else str(r.readings[c]) for c in columns),
            "dense" if r.chosen is None else str(r.chosen),
            f"{r.breakeven:.0f}",
        )
    console = stdout_console()
    if recipe and recipe.get("warning"):  # auto fell back to the generic recipe
        console.print(f"[yellow]warning:[/] {as_flags(recipe['warning'], 'estimate-ranks')}")
    if not quiet:
        print_notes(est.notices, "estimate-ranks", console)
    console.print(table)
    info = est.info
    if info.samples:
        console.print(
            f"statistics: {info.samples} samples in {info.calibration_seconds:.1f} s, "
            f"{info.statistics_bytes / 2**20:.1f} MB of Gram matrices"
        )
    for path in written:
        console.print(f"wrote {path}")
