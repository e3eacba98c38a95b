"""`dlnc bench`: the research benchmarks (wide vs compressed deep linear networks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import check_outputs, print_json, progress_bars, stdout_console, user_errors

app = typer.Typer(
    no_args_is_help=True, pretty_exceptions_show_locals=False, help="Research benchmarks."
)

Task = Annotated[
    str, typer.Option(help="factorization | completion | sensing (docs/method.md section 2).")
]


def _stage(callback, name: str):
    """Adapt the library's (step, total, info) callback to a named progress bar."""
    return lambda step, total, info: callback(name, step, total)


def _set_threads(threads: int) -> None:
    """Small matmuls gain nothing from a second thread, and lose a lot on a busy machine."""
    import torch

    from compressor.errors import DlncError

    if threads < 1:
        raise DlncError(f"`threads` must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def dln_table(result: dict) -> Table:
    """Wide vs compressed: iterations and time to the target loss, final loss and errors."""
    table = Table(title="Deep linear network: wide vs compressed")
    table.add_column("network", no_wrap=True)
    for name in ("params", "iters", "secs", "ms/step", "loss", "test err", "recov err"):
        table.add_column(name, justify="right")
    for name in ("wide", "compressed"):
        row = result[name]
        mark = "" if row["reached_target"] else " (not reached)"
        table.add_row(
            name, str(row["parameters"]), f"{row['iterations']}{mark}",
            f"{row['seconds']:.2f}", f"{row['ms_per_step']:.3f}",
            _fmt(row["final_train_loss"], ".2e"), _fmt(row["final_test_error"], ".2e"),
            _fmt(row["final_recovery_error"], ".2e"),
        )  # fmt: skip
    speedups = f"{result['speedup_iterations']:.2f}x, {result['speedup_seconds']:.2f}x"
    table.caption = f"speedup (iterations, wall time): {speedups}"
    return table


@app.command("dln")
def dln(
    task: Task = "completion",
    d: Annotated[int, typer.Option("--d", help="The target is d x d.")] = 100,
    r: Annotated[int, typer.Option("--r", help="Rank of the target (compressed width 2r).")] = 5,
    depth: Annotated[int, typer.Option(help="Number of layers L of both networks.")] = 3,
    eta: Annotated[float, typer.Option(help="GD step size.")] = 10.0,
    alpha: Annotated[
        float, typer.Option(help="Discrepant lr of the compressed outer layers.")
    ] = 5.0,
    eps: Annotated[float, typer.Option(help="Init scale of both networks.")] = 1e-2,
    observed: Annotated[float, typer.Option(help="Completion: fraction observed.")] = 0.3,
    measurements: Annotated[int, typer.Option(help="Sensing: number of measurements.")] = 4000,
    max_iters: Annotated[int, typer.Option(help="Stop after this many GD steps.")] = 20_000,
    tol: Annotated[float, typer.Option(help="Target training loss.")] = 1e-12,
    log_every: Annotated[int, typer.Option(help="Record the metrics every N steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seeds the target, the data and the init.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads for both runs.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    plot: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Draw recovery error curves to a PNG.")
    ] = None,
) -> None:
    """Wide vs compressed deep linear network on one matrix-recovery problem.

    Both train by full-batch GD on the same data; the table gives iterations and wall time to
    the target training loss, final loss and errors, and the compressed network's speedups.
    """
    from compressor.dln.experiment import DLNBenchConfig, run_dln_benchmark
    from compressor.dln.problems import ProblemConfig
    from compressor.dln.train import TrainConfig

    with user_errors():
        check_outputs(plot=plot)
        _set_threads(threads)
        problem = ProblemConfig(task, d, r, observed, measurements, seed)
        config = DLNBenchConfig(
            problem, TrainConfig(eta, max_iters, tol, log_every), depth, eps, alpha, device
        )
        with progress_bars(not as_json) as progress:
            result = run_dln_benchmark(
                config, _stage(progress, "wide"), _stage(progress, "compressed")
            )
    summary = result.to_dict()
    if plot is not None:
        from compressor.dln.plots import plot_recovery
        from compressor.io.files import atomic_path

        with user_errors(), atomic_path(plot) as tmp:
            plot_recovery(result, tmp, title=f"{task}, d={d}, r={r}, L={depth}")
    if as_json:
        print_json(summary)
        return
    stdout_console().print(dln_table(summary))
    if plot is not None:
        typer.echo(f"plot: {plot}")


def mlp_table(result) -> Table:
    """Wide vs compressed chain: accuracy and training time."""
    table = Table(title="MLP on digits: wide vs compressed linear chain")
    table.add_column("chain")
    for name in ("chain params", "test acc", "train acc", "seconds"):
        table.add_column(name, justify="right")
    for name in ("wide", "compressed"):
        run = getattr(result, name)
        table.add_row(
            name, str(run.chain_parameters), f"{run.test_accuracy:.4f}",
            f"{run.train_accuracy:.4f}", f"{run.seconds:.2f}",
        )  # fmt: skip
    table.caption = f"wall-time speedup: {result.speedup_seconds:.2f}x"
    return table


@app.command("mlp")
def mlp(
    width: Annotated[
        int, typer.Option(help="Hidden width (the wide chain is width x width).")
    ] = 1024,
    r: Annotated[int, typer.Option("--r", help="The compressed chain has width 2r.")] = 8,
    depth: Annotated[int, typer.Option(help="Number of factors in the chain.")] = 3,
    epochs: Annotated[int, typer.Option(help="Full-batch training steps.")] = 300,
    lr: Annotated[float, typer.Option(help="Step size (SGD with momentum 0.9).")] = 0.05,
    alpha: Annotated[
        float, typer.Option(help="Discrepant lr of the compressed outer factors.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seeds the split and the init.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads for both runs.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """MLP on scikit-learn's digits with a wide vs a compressed linear-chain hidden layer.

    The chain has width x width factors (wide) or width 2r inside (compressed), no activation
    within it; the table gives test accuracy and training time of both.
    """
    from dataclasses import asdict

    from compressor.dln.mlp import MLPConfig, run_mlp

    with user_errors():
        _set_threads(threads)
        config = MLPConfig(width=width, r=r, depth=depth, epochs=epochs, lr=lr, alpha=alpha,
                           seed=seed)  # fmt: skip
        with progress_bars(not as_json) as progress:
            result = run_mlp(config, _stage(progress, "wide"), _stage(progress, "compressed"))
    if as_json:
        print_json({**asdict(result), "speedup_seconds": result.speedup_seconds})
        return
    stdout_console().print(mlp_table(result))
