"""Where an export may go and how it is written: never inside the input, a parent that cannot be
written found before the work, a failing write is one line and leaves nothing, and the leftovers
of a dead process are cleaned up (`io/export.py`'s `check_output_dir`, `remove_stale_temps`;
`io/files.py`)."""

from __future__ import annotations

import errno
import os

import pytest
from cli_helpers import dlnc, one_line_error
from conftest import tree_snapshot

from compressor.errors import DlncError


def test_an_output_inside_the_input_folder_is_refused(gpt2):
    before = tree_snapshot(gpt2)
    result = dlnc("compress", gpt2, "--out", gpt2 / "sub")
    one_line_error(result, "inside the input")
    assert not (gpt2 / "sub").exists() and tree_snapshot(gpt2) == before


def test_an_output_beside_a_bare_weights_file_is_still_fine(gpt2):
    """Given the bare file, the folder holding it is not the input: a sibling output is fine
    (and is not created by the check); given the folder, the same output is inside it."""
    from compressor.io.export import check_output_dir

    check_output_dir(gpt2 / "model-dlnc", False, gpt2 / "model.safetensors")
    assert not (gpt2 / "model-dlnc").exists()
    with pytest.raises(DlncError, match="inside the input"):
        check_output_dir(gpt2 / "model-dlnc", False, gpt2)


def test_an_unwritable_parent_is_found_before_the_work(gpt2, tmp_path, monkeypatch, no_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: p != locked and real_access(p, mode))
    result = dlnc("compress", gpt2, "--out", locked / "new" / "out")
    one_line_error(result, str(locked), "not writable")


@pytest.mark.parametrize(
    ("err", "cause"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
        (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        ("safetensors", "No space left on device"),
    ],
)
def test_a_failing_write_is_one_line_and_leaves_nothing(err, cause, gpt2, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def fail(tensors, filename, *args, **kwargs):
        if err == "safetensors":
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        raise type(err)(err.errno, err.strerror, filename)

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    result = dlnc("compress", gpt2, "--out", tmp_path / "out", "--no-generate")
    one_line_error(result, str(tmp_path / "out"), cause)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_a_stale_temp_folder_of_a_dead_process_is_removed(gpt2, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".old-out.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    stale_plot = tmp_path / f".spectra.tmp-{int(dead.stdout)}.png"
    stale_plot.write_bytes(b"partial")
    alive = tmp_path / f".other.tmp-{os.getppid()}"  # a running process's: left alone
    alive.mkdir()
    result = dlnc("compress", gpt2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and not stale_plot.exists() and alive.exists()
