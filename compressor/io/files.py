"""Writing files so that a failure leaves nothing: checks before the work, a temp path
renamed into place when complete, and one-line errors for a disk that refuses the write."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import DlncError, first_line

__all__ = ["atomic_path", "check_writable", "scratch_beside", "write_error"]


def check_writable(path: str | os.PathLike) -> None:
    """Raise a `DlncError` unless `path` can be created: its nearest existing ancestor is a
    folder this process may write in (a read-only mount counts as not writable)."""
    path = Path(path).resolve()
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DlncError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DlncError(f"{path}: {folder} is not writable")


def write_error(path: str | os.PathLike, e: BaseException) -> DlncError:
    """One line for a failed write (permission, read-only mount, full disk): the path and
    the cause, whether it came from Python (OSError) or from safetensors' writer."""
    cause = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
    return DlncError(f"{path}: cannot write ({cause})")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` (same extension) to write to; renamed onto `path` when the
    block completes, removed when it fails. A failed write is a one-line `DlncError`."""
    from safetensors import SafetensorError

    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from e
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextmanager
def scratch_beside(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `out` (its parent made if missing), removed afterwards with
    the folders made for it that stayed empty: scratch files (Gram reductions, whiteners,
    activations) sit on the output's disk."""
    import tempfile

    parent = Path(out).resolve().parent
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.grams-", dir=parent) as tmp:
            yield Path(tmp)
    finally:
        for folder in made:  # the folders made for it, if nothing else went there
            try:
                folder.rmdir()
            except OSError:
                break
