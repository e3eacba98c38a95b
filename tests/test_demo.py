"""`dlnc demo --fast`: the whole pipeline end to end on the embedded digits model."""

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app


def test_demo_fast_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(out)])
    assert result.exit_code == 0, result.output
    png = out / "report.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in result.output.replace("\n", "")
    wide = load_file(out / "wide" / "model.safetensors")
    compressed = load_file(out / "compressed" / "model.safetensors")
    n_wide = sum(t.numel() for t in wide.values())
    n_comp = sum(t.numel() for t in compressed.values())
    assert n_comp < 0.15 * n_wide
    assert any(k.endswith(".down.weight") for k in compressed)
    report = json.loads((out / "compressed" / "report.json").read_text())
    assert report["method"] == "dynamics"

    from compressor.io.load import load_pretrained
    from compressor.workflows.demo import DemoSettings, WideMLP, accuracy, digits

    _, test = digits(0)
    width = DemoSettings.fast().width
    model = WideMLP(width)
    model.load_state_dict(wide)
    small = load_pretrained(out / "compressed", model=WideMLP(width))
    assert accuracy(model, test) > 0.9
    # each stage shows its value: the cut visibly costs accuracy, fine-tuning wins it back
    row = next(r for r in _table_rows(result.output) if r[0] == "test accuracy")
    wide_acc, compressed_acc, tuned_acc = map(float, row[1:])
    assert wide_acc == round(accuracy(model, test), 3)
    assert tuned_acc == round(accuracy(small, test), 3)
    assert compressed_acc < wide_acc - 0.1
    assert tuned_acc > compressed_acc + 0.1
    with torch.no_grad():
        assert small(test["x"]).shape == (len(test["x"]), 10)


def _table_rows(output: str) -> list[list[str]]:
    """The cells of each row of the rich tables in `output`."""
    return [
        [c.strip() for c in line.strip("│┃ ").split("│")]
        for line in output.splitlines()
        if line.count("│") >= 3
    ]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--fast", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "not written by dlnc demo" in result.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_fine_tuning_loss_goes_down_without_a_spike(tmp_path):
    """The recovery step of the demo improves on where it starts (issue 11: it used to spike
    from ~1e-4 to ~1.5 at lr 1e-3 and end above its start)."""
    from statistics import mean

    from compressor.workflows.demo import DemoSettings, run_demo

    losses = run_demo(tmp_path / "demo", DemoSettings.fast()).losses
    first, last = mean(losses[:10]), mean(losses[-10:])
    assert last < first
    assert max(losses) < 3 * first
