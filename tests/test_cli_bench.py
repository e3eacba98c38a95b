"""`dlnc bench dln` / `dlnc bench mlp` through typer's CliRunner, on tiny problems."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.bench import app

runner = CliRunner()
TINY = ["--d", "12", "--r", "2", "--eta", "5", "--alpha", "2", "--max-iters", "300"]
TINY += ["--log-every", "50", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("task", ["factorization", "completion", "sensing"])
def test_json_has_both_networks_and_the_speedups(task):
    result = runner.invoke(app, ["dln", "--task", task, *TINY, "--measurements", "300", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for name in ("wide", "compressed"):
        keys = ("iterations", "seconds", "final_train_loss", "final_test_error")
        assert all(key in data[name] for key in keys)
        assert 0 < data[name]["iterations"] <= 300
    assert data["speedup_seconds"] > 0
    assert data["speedup_iterations"] > 0
    assert data["wide"]["parameters"] == 3 * 12 * 12
    assert data["compressed"]["parameters"] == 2 * 12 * 4 + 4 * 4


def test_table_and_plot(tmp_path):
    png = tmp_path / "recovery.png"
    result = runner.invoke(app, ["dln", "--task", "completion", *TINY, "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "compressed" in result.stdout and "speedup" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--d", "10", "--r", "6"], "`r`"),
        (["--observed", "0"], "`observed`"),
        (["--observed", "1.5"], "`observed`"),
        (["--depth", "1"], "`depth`"),
        (["--task", "denoising"], "`task`"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_1(args, field):
    result = runner.invoke(app, ["dln", *args, "--max-iters", "10", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_mlp_json():
    args = ["mlp", "--width", "32", "--r", "4", "--epochs", "20", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["wide"]["chain_parameters"] > data["compressed"]["chain_parameters"]
    assert 0 <= data["compressed"]["test_accuracy"] <= 1
    assert data["speedup_seconds"] > 0


def test_mlp_bad_rank():
    result = runner.invoke(app, ["mlp", "--width", "16", "--r", "9"])
    assert result.exit_code == 1
    assert "`r`" in result.stderr
