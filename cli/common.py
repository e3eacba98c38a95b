"""What every command shares: one-line user errors, progress bars, number formatting."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err_console = Console(stderr=True)
PIPED_WIDTH = 4096  # columns of a table written to a file or a pipe: never cut, never folded


def stdout_console() -> Console:
    """The console for a command's output on stdout: the terminal's width, or when stdout
    is piped or redirected, wide enough that every column and layer name stays whole."""
    out = Console()
    return out if out.is_terminal else Console(width=PIPED_WIDTH)


def quiet_libraries() -> None:
    """transformers' own progress bars and warnings would drown ours."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def fail(message: str, command: str | None = None) -> None:
    """One clear line on stderr and exit code 1, no traceback; the library's `parameter`
    names become the flags of `command`."""
    typer.echo(f"error: {as_flags(message, command)}", err=True)
    raise typer.Exit(code=1)


ALIASES = {"compress": {"steps": "--finetune-steps"}, "speed": {"decode_batches": "--batch"}}
"""Where a command's flag for a parameter has another name."""


def as_flags(message: str, command: str | None = None) -> str:
    """Replace each backticked library parameter (`keep`, `warmup_steps`) by its flag
    (--keep, --warmup-steps): the one place where parameter names become flags. A message
    that already names its flag ("--rank: `rank` must be >= 1", a recipe value given on the
    command line) and any message outside a command (bench, recipes) stay as they are."""
    if command is None or re.match(r"--[a-z-]+: ", message):
        return message
    aliases = ALIASES.get(command or "", {})
    flags = command_parameters(command)

    def swap(match: re.Match) -> str:
        name = match.group(1)
        if name in aliases:
            return aliases[name]
        return "--" + name.replace("_", "-") if name in flags else match.group(0)

    return re.sub(r"`([a-z_]+)`", swap, message)


COMMANDS: dict[str, typer.Typer] = {}
"""The app whose commands `as_flags` reads, by name: `cli.main` registers itself here (so
this module imports no command, and no command imports `cli.main`)."""


def register_app(app: typer.Typer) -> None:
    """Let `as_flags` read the flags of `app`'s commands."""
    COMMANDS["dlnc"] = app
    command_parameters.cache_clear()


@functools.cache
def command_parameters(command: str) -> frozenset[str]:
    """The parameters of the `dlnc command` whose flag has the same name (`warmup_steps` is
    --warmup-steps), read from the Typer app itself."""
    import typer.main

    click_command = typer.main.get_command(COMMANDS["dlnc"]).commands[command]
    return frozenset(
        p.name for p in click_command.params if f"--{p.name.replace('_', '-')}" in p.opts
    )


INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT)


@contextmanager
def user_errors(command: str | None = None) -> Iterator[None]:
    """Turn the library's user errors (and a file that cannot be read or written) into
    `fail`, naming `command`'s flags; Ctrl-C exits 130 with one line, whichever command it
    stops."""
    from compressor.errors import DlncError, Interrupted, first_line

    try:
        yield
    except Interrupted as e:
        typer.echo(as_flags(first_line(e), command), err=True)
        raise typer.Exit(code=INTERRUPTED) from None
    except DlncError as e:
        fail(first_line(e), command)
    except FileNotFoundError as e:
        fail(f"{e.filename}: no such file or folder")
    except OSError as e:
        fail(f"{e.filename or 'a file'}: {e.strerror or first_line(e)}")
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(code=INTERRUPTED) from None


def print_notes(notices: list[str], command: str, console: Console | None = None) -> None:
    """The library's notices, one `note:` line each, its `parameter`s named as `command`'s
    flags: on `console` (a command's output), else on stderr (when stdout carries JSON)."""
    from rich.markup import escape

    out = console or err_console
    for notice in notices:
        out.print(f"[yellow]note:[/] {escape(as_flags(notice, command))}", soft_wrap=True)


def check_outputs(**files: Path | None) -> None:
    """Before any work: every file a command will write (by option name: plot, save) goes
    into an existing, writable folder, and a plot has a type matplotlib writes."""
    from compressor.errors import DlncError, first_line
    from compressor.io.files import check_writable

    for option, path in files.items():
        if path is None:
            continue
        flag = "--" + option.replace("_", "-")
        if not path.parent.resolve().is_dir():
            raise DlncError(f"{flag} {path}: no such folder {path.parent}")
        if path.is_dir():
            raise DlncError(f"{flag} {path}: is a folder; give a file name")
        try:
            check_writable(path)
        except DlncError as e:
            raise DlncError(f"{flag} {first_line(e)}") from e
        if option == "plot":
            from cli.plots import check_plot_path

            check_plot_path(path)


LOG_EVERY = 10
"""Steps between two plain progress lines when no bar can be drawn (`--log-every`)."""


@contextmanager
def progress_bars(enabled: bool = True, log_every: int = LOG_EVERY) -> Iterator:
    """A rich Progress and the library's `progress(stage, done, total, **metrics)` callback
    that drives it: one bar per stage, its metrics (loss, lr, steps/s, time left) beside it.
    Where no bar can be drawn (stderr is a log file, SLURM's output, CI's), a stage that
    reports a loss writes a plain line every `log_every` steps and at its last (0: none).
    Only the main process of a multi-process launch draws."""
    if log_every < 0:
        fail(f"--log-every must be >= 0, got {log_every}")
    shown = enabled and is_main_process()
    plain = shown and not err_console.is_terminal
    progress = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=True,
        disable=plain or not shown,
    )
    tasks: dict[str, int] = {}

    def callback(stage: str, done: int, total: int, /, **metrics: float) -> None:
        if plain:
            if "loss" in metrics and log_every and (done % log_every == 0 or done == total):
                typer.echo(f"{stage} step {done}/{total}  {_metrics(metrics)}", err=True)
            return
        if not tasks:
            progress.start()  # lazily, so an early error prints nothing but its line
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total, info="")
        progress.update(tasks[stage], completed=done, total=total, info=_metrics(metrics))

    try:
        yield callback
    finally:
        if tasks:
            progress.stop()


def _metrics(metrics: dict[str, float]) -> str:
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4g}")
    if metrics.get("lr") is not None:
        parts.append(f"lr {metrics['lr']:.3g}")
    if "steps_per_s" in metrics:
        parts.append(f"{metrics['steps_per_s']:.2f} steps/s")
    if "eta_s" in metrics and metrics["eta_s"] != float("inf"):
        minutes, seconds = divmod(int(metrics["eta_s"]), 60)
        hours, minutes = divmod(minutes, 60)
        parts.append(f"{hours}:{minutes:02d}:{seconds:02d} left")
    return "  ".join(parts)


def is_main_process() -> bool:
    """False on the other processes of a `torchrun` / `accelerate launch` run."""
    return int(os.environ.get("RANK", "0")) == 0


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)
