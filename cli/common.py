"""What every command shares: one-line user errors, progress bars, number formatting."""

from __future__ import annotations

import json
import logging
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


def fail(message: str) -> None:
    """One clear line on stderr and exit code 1, no traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)


INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C (128 + SIGINT)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user errors (and a file that cannot be read or written) into
    `fail`; Ctrl-C exits 130 with one line, whichever command it stops."""
    from compressor.errors import DlncError, Interrupted, first_line

    try:
        yield
    except Interrupted as e:
        typer.echo(first_line(e), err=True)
        raise typer.Exit(code=INTERRUPTED) from None
    except DlncError as e:
        fail(first_line(e))
    except FileNotFoundError as e:
        fail(f"{e.filename}: no such file or folder")
    except OSError as e:
        fail(f"{e.filename or 'a file'}: {e.strerror or first_line(e)}")
    except KeyboardInterrupt:
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(code=INTERRUPTED) from None


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


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator:
    """A rich Progress and a `progress(stage, done, total)` callback that drives it."""
    progress = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not enabled,
    )
    tasks: dict[str, int] = {}

    def callback(stage: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()  # lazily, so an early error prints nothing but its line
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done, total=total)

    try:
        yield callback
    finally:
        if tasks:
            progress.stop()


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
