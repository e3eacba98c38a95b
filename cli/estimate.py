"""`dlnc estimate-ranks`: per-layer ranks from the weights, the data and the dynamics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from cli import aware as opt
from cli.common import (
    check_outputs,
    print_json,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)


def estimate_ranks(
    model: Annotated[Path, typer.Argument(help="Model folder, or a .safetensors file.")],
    data: opt.Data = None,
    method: opt.Method = None,
    keep: Annotated[
        float, typer.Option(help="Global budget for the chosen ranks: fraction of weights kept.")
    ] = 0.5,
    tau: Annotated[float, typer.Option(help="Energy fraction of the per-spectrum ranks.")] = 0.9,
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
    include: Annotated[
        list[str] | None, typer.Option(help="Only these modules (name or re:REGEX).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Leave these modules out (name or re:REGEX).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="config.json for a bare weights file.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of the spectra and chosen ranks.")
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Write the chosen ranks to a YAML file for --ranks.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the estimates as JSON.")] = False,
) -> None:
    """Estimate per-layer ranks without compressing: the energy rank (at --tau) of the weight's
    spectrum, of its activation-aware spectrum (with --data), and of its update (with
    --reference or --warmup-steps), the rank --method chooses under --keep, and break-even.

    Save the chosen ranks with --save ranks.yaml and use them with `dlnc compress --ranks`.
    """
    from compressor.core.ranks import RankPolicy
    from compressor.errors import DlncError
    from compressor.io.checkpoint import load_checkpoint
    from compressor.io.rankfile import save_ranks
    from compressor.methods.plan import estimate_layers
    from compressor.workflows.compress import CompressOptions, select_targets
    from compressor.workflows.plan import make_plan

    quiet_libraries()
    with user_errors():
        check_outputs(plot=plot, save=save)
        if not 0.0 < tau <= 1.0:
            raise DlncError(f"--tau must be in (0, 1], got {tau}")
        policy = RankPolicy(keep=keep)
        aware = opt.aware_options(
            method, data, text_field, label_field, tokenizer, max_length, samples, seed,
            batch_size, reference, warmup_steps, warmup_lr,
        )  # fmt: skip
        options = CompressOptions(policy=policy, include=include or None, exclude=exclude or [])
        loaded = load_checkpoint(model, config)
        targets = select_targets(loaded, options)
        with progress_bars(not json_out) as progress:
            plan, info = make_plan(loaded, targets, aware, progress, everything=True)
        rows = estimate_layers(plan, policy, tau)
        chosen = {r.name: r.chosen for r in rows}
        if plot is not None:
            from cli.plots import plot_spectra

            plot_spectra(plan.spectra, plot, chosen, title=f"{plan.method} spectra (s_i / s_1)")
        if save is not None:
            save_ranks(save, chosen, method=plan.method, keep=keep, model=str(model))
    if json_out:
        print_json({"method": plan.method, "keep": keep, "tau": tau,
                    "info": asdict(info), "layers": [asdict(r) for r in rows]})  # fmt: skip
        return
    _print(rows, plan.method, keep, tau, info, [p for p in (plot, save) if p])


def _print(rows, method: str, keep: float, tau: float, info, written: list[Path]) -> None:
    from rich.table import Table

    table = Table(title=f"dlnc estimate-ranks ({method}, keep {keep:g}, energy ranks at {tau:g})")
    table.add_column("layer", overflow="fold", min_width=24)
    heads = ("shape", "spectrum", "act-aware", "dynamics", "chosen", "break-even")
    for col in heads:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.name,
            "x".join(map(str, r.shape)),
            str(r.spectrum_rank),
            "-" if r.whiten_rank is None else str(r.whiten_rank),
            "-" if r.dynamics_rank is None else str(r.dynamics_rank),
            "dense" if r.chosen is None else str(r.chosen),
            f"{r.breakeven:.0f}",
        )
    console = stdout_console()
    console.print(table)
    if info.samples:
        console.print(
            f"statistics: {info.samples} samples in {info.calibration_seconds:.1f} s, "
            f"{info.statistics_bytes / 2**20:.1f} MB of Gram matrices"
        )
    for path in written:
        console.print(f"wrote {path}")
