"""Every `dlnc` subcommand that writes, on a full disk: one line naming the cause, exit 1,
and nothing left behind (no partial file, no temp folder, no half-made output folder).

The disk is simulated: a write into the test's folder opens the file and then fails with
ENOSPC on its first byte, as a full tmpfs does; safetensors' writer (Rust, outside Python's
`open`) leaves a partial file and raises its own error."""

from __future__ import annotations

import builtins
import errno
import io
from pathlib import Path

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
NO_SPACE = "No space left on device"


class FullFile:
    """A file opened for writing on a full disk: every write fails."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, NO_SPACE, self.handle.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


@pytest.fixture
def full_disk(monkeypatch):
    """`fill(root)`: from now on every write under `root` fails with ENOSPC."""

    def fill(root: Path) -> None:
        real_open = io.open
        from safetensors import SafetensorError

        def under_root(file) -> bool:
            try:
                return Path(file).resolve().is_relative_to(root)
            except TypeError:
                return False

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and under_root(file):
                return FullFile(handle)
            return handle

        def serialize_file(tensors, filename, metadata=None):
            if under_root(filename):
                with real_open(filename, "wb") as f:
                    f.write(b"\x00" * 16)  # what reached the disk before it filled up
                raise SafetensorError(
                    f"Error while serializing: I/O error: {NO_SPACE} (os error 28)"
                )
            return real_serialize(tensors, filename, metadata)

        import safetensors.torch

        real_serialize = safetensors.torch.serialize_file
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)

    return fill


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny GPT-2, its export and token data, written while the disk still had room."""
    root = tmp_path_factory.mktemp("inputs")
    build_tiny("gpt2").save_pretrained(root / "gpt2")
    g = torch.Generator().manual_seed(0)
    save_file(
        {"input_ids": torch.randint(1, 64, (24, 12), generator=g)}, root / "tokens.safetensors"
    )
    done = runner.invoke(app, ["compress", str(root / "gpt2"), "--rank", "4", "--out",
                               str(root / "small")])  # fmt: skip
    assert done.exit_code == 0, done.output
    return root


COMMANDS = {
    "compress": ["compress", "{i}/gpt2", "--out", "{o}/out"],
    "compress-plot": ["compress", "{i}/gpt2", "--out", "{o}/out", "--plot", "{o}/s.png"],
    "compress-finetune": ["compress", "{i}/gpt2", "--out", "{o}/deep/out", "--finetune-steps",
                          "2", "--finetune-data", "{i}/tokens.safetensors"],
    "estimate-save": ["estimate-ranks", "{i}/gpt2", "--save", "{o}/ranks.yaml"],
    "estimate-plot": ["estimate-ranks", "{i}/gpt2", "--plot", "{o}/s.png"],
    "inspect-plot": ["inspect", "{i}/gpt2", "--plot", "{o}/s.png"],
    "finetune": ["finetune", "{i}/small", "--data", "{i}/tokens.safetensors", "--steps", "2",
                 "--teacher", "{i}/gpt2", "--out", "{o}/ft"],
    "finetune-state": ["finetune", "{i}/small", "--data", "{i}/tokens.safetensors", "--steps",
                       "2", "--teacher", "{i}/gpt2", "--out", "{o}/ft", "--save-every", "1"],
    "bench-dln-plot": ["bench", "dln", "--d", "12", "--r", "2", "--max-iters", "20",
                       "--plot", "{o}/dln.png"],
    "demo": ["demo", "--fast", "--out", "{o}/demo"],
}  # fmt: skip


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_full_disk_is_one_line_and_leaves_nothing(name, inputs, tmp_path, full_disk):
    if name == "demo":
        pytest.importorskip("sklearn")
    args = [a.format(i=inputs, o=tmp_path) for a in COMMANDS[name]]
    before = sorted(tmp_path.rglob("*"))
    full_disk(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is not None
    # progress lines (written where no bar can be drawn) end in "steps/s ... left"; the rest is
    # the error
    lines = [x for x in result.stderr.strip().splitlines() if "steps/s" not in x]
    assert len(lines) == 1 and lines[0].startswith("error: ") and NO_SPACE in lines[0], lines
    assert sorted(tmp_path.rglob("*")) == before
