"""Shared pieces of the tests that drive the `dlnc` command line: invoking it, checking that a
failure is one `error: ...` line, editing a saved config, a file of token ids."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def dlnc(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str, code: int = 1) -> str:
    """The command failed with exactly one `error: ...` line on stderr holding `needles`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def token_file(path, rows=16, length=12):
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(2, 64, (rows, length), generator=g)}, path)
    return path
