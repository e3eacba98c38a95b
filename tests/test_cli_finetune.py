"""`dlnc finetune` and `dlnc eval` end to end on a tiny GPT-2 (token data as .safetensors)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from compressor.io.load import load_pretrained

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny GPT-2, its `dlnc compress` output and token data (made once)."""
    tmp_path = tmp_path_factory.mktemp("cli_finetune")
    original = tmp_path / "gpt2"
    build_tiny("gpt2").save_pretrained(original)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.randint(1, 64, (40, 16), generator=g)}, data)
    compressed = tmp_path / "small"
    done = runner.invoke(
        app, ["compress", str(original), "--out", str(compressed), "--keep", "0.3"]
    )
    assert done.exit_code == 0, done.output
    return original, compressed, data


def test_finetune_writes_an_export_with_a_report(setup, tmp_path):
    original, compressed, data = setup
    out = tmp_path / "ft"
    args = ["finetune", str(compressed), "--data", str(data), "--teacher", str(original),
            "--steps", "6", "--lr", "3e-3", "--out", str(out), "--save-every", "3",
            "--json"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    section = json.loads((out / "report.json").read_text())["finetune"]
    assert section["steps"] == 6 and "KL on logits" in section["objective"]
    # when training made the held-out loss worse, the start is returned and "trained" keeps
    # the numbers of the discarded weights
    expected = {"original", "before", "after"} | ({"trained"} if section["kept_start"] else set())
    assert set(section["eval"]) == expected
    after = section["eval"]["after"]
    assert after["distill"] <= section["eval"]["before"]["distill"]  # never worse than the start
    assert after["samples"] == 4  # 10% of 40 held out
    assert (tmp_path / "ft.state" / "checkpoint-0000006").is_dir()
    model = load_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits).all()

    done = runner.invoke(app, ["eval", str(out), "--data", str(data), "--teacher", str(original),
                               "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert rows["original"]["distill"] == pytest.approx(0.0, abs=1e-9)
    assert rows["model"]["distill"] > 0 and rows["model"]["perplexity"] > 1


def test_temperature_from_the_recipe_and_the_flag_over_it(setup, tmp_path):
    original, compressed, data = setup
    recipe = tmp_path / "cool.yaml"
    recipe.write_text("name: cool\nfinetune: {objective: distill, temperature: 1.5}\n")
    for extra, shown in [([], "T=1.5"), (["--temperature", "0.5"], "T=0.5")]:
        out = tmp_path / f"ft{len(extra)}"
        args = ["finetune", str(compressed), "--data", str(data), "--teacher", str(original),
                "--recipe", str(recipe), "--steps", "1", "--out", str(out), "--json",
                *extra]  # fmt: skip
        done = runner.invoke(app, args)
        assert done.exit_code == 0, done.output
        assert f"KL on logits ({shown})" in json.loads(done.stdout)["finetune"]["objective"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--objective", "distill"], "give --teacher"),
        (["--resume", "--objective", "task"], "no checkpoint to resume from"),
        (["--lr", "-1"], "--lr"),
        (["--temperature", "0"], "--temperature: `temperature` must be > 0"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(setup, tmp_path, extra, message):
    _, compressed, data = setup
    out = tmp_path / "ft"
    done = runner.invoke(app, ["finetune", str(compressed), "--data", str(data), "--steps", "2",
                               "--out", str(out), *extra])  # fmt: skip
    assert done.exit_code == 1
    assert message in done.stderr and "Traceback" not in done.output
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_of_a_plain_model_on_its_task(setup):
    original, _, data = setup
    done = runner.invoke(app, ["eval", str(original), "--data", str(data), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["model"]["perplexity"] > 1


def test_compress_with_finetune_steps_exports_once(setup, tmp_path):
    original, _, data = setup
    out = tmp_path / "one-shot"
    args = ["compress", str(original), "--out", str(out), "--keep", "0.3",
            "--finetune-steps", "3", "--finetune-data", str(data), "--json"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["steps"] == 3 and report["targeted_keep"] < 0.35
    section = report["finetune"]
    kept = {"trained"} if section["kept_start"] else set()
    assert set(section["eval"]) == {"original", "before", "after"} | kept
    load_pretrained(out)


def test_compress_finetune_steps_needs_data(setup, tmp_path):
    original, _, _ = setup
    out = tmp_path / "x"
    done = runner.invoke(app, ["compress", str(original), "--out", str(out),
                               "--finetune-steps", "3"])  # fmt: skip
    assert done.exit_code == 1 and "--finetune-data" in done.stderr and not out.exists()


def read_scalars(folder):
    """The scalars of the tensorboard event files in `folder`: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}  # fmt: skip


def test_training_logs_history_plot_and_tensorboard(setup, tmp_path):
    """Without a terminal a line every --log-every steps; report.json keeps every step's loss
    and lr, loss.png is drawn beside it, and tensorboard's event file holds the same losses."""
    original, compressed, data = setup
    out = tmp_path / "ft"
    args = ["finetune", str(compressed), "--data", str(data), "--teacher", str(original),
            "--steps", "5", "--lr", "3e-3", "--out", str(out), "--log-every", "2",
            "--report-to", "tensorboard"]  # fmt: skip
    done = runner.invoke(app, args)  # CliRunner's stderr is no terminal
    assert done.exit_code == 0, done.output
    lines = [line for line in done.stderr.splitlines() if line.startswith("finetune step")]
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]
    assert all(re.search(r"loss [0-9.e+-]+  lr [0-9.e+-]+  [0-9.]+ steps/s", x) for x in lines)
    section = json.loads((out / "report.json").read_text())["finetune"]
    history = section["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] == section["final_loss"] and history[0]["lr"] > history[-1]["lr"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs = tmp_path / "ft.state" / "logs"
    assert section["logs"] == str(logs) and str(logs) in done.stdout
    scalars = read_scalars(logs / "finetune")
    as_float32 = [float(torch.tensor(h["loss"], dtype=torch.float32)) for h in history]
    assert scalars["loss"] == list(enumerate(as_float32, start=1))
    assert [v for _, v in scalars["lr"]] == pytest.approx([h["lr"] for h in history], rel=1e-6)


def test_an_unknown_or_missing_tracker_is_refused_before_work(setup, tmp_path):
    _, compressed, data = setup
    out = tmp_path / "ft"
    for tracker, message in (("tensorbored", "unknown tracker 'tensorbored'"),
                             ("aim", "--report-to aim: aim is not installed")):  # fmt: skip
        args = ["finetune", str(compressed), "--data", str(data), "--steps", "2",
                "--out", str(out), "--report-to", tracker]  # fmt: skip
        done = runner.invoke(app, args)
        assert done.exit_code == 1 and message in done.stderr, done.output
        assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
        assert not (tmp_path / "ft.state").exists()


def test_compress_interrupted_in_fine_tuning_says_resume_and_resumes(setup, tmp_path, monkeypatch):
    """Ctrl-C in `compress --finetune-steps` names a flag compress has (--resume), and
    --resume continues from the saved step to the same history as an uninterrupted run."""
    import os
    import signal

    from compressor.training import loop

    original, _, data = setup
    base = ["compress", str(original), "--keep", "0.3", "--finetune-steps", "4",
            "--finetune-data", str(data), "--quiet"]  # fmt: skip
    whole = runner.invoke(app, [*base, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    report = loop._Loop._report

    def ctrl_c_after_step_2(self, start):
        report(self, start)
        if self.state.step == 2 and not self.config.save_every:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop._Loop, "_report", ctrl_c_after_step_2)
    out = tmp_path / "out"
    stopped = runner.invoke(app, [*base, "--out", str(out)])
    assert stopped.exit_code == 130 and not out.exists()
    assert stopped.stderr.strip().endswith("run again with --resume to continue")
    monkeypatch.setattr(loop._Loop, "_report", report)
    resumed = runner.invoke(app, [*base, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    section = json.loads((out / "report.json").read_text())["finetune"]
    expected = json.loads((tmp_path / "whole" / "report.json").read_text())["finetune"]
    assert section["resumed_from"] == 2 and section["history"] == expected["history"]


def test_quiet_leaves_out_progress_lines_and_notes(setup, tmp_path):
    original, compressed, data = setup
    args = ["finetune", str(compressed), "--data", str(data), "--steps", "2",
            "--objective", "task", "--log-every", "1", "--eval-fraction", "0"]  # fmt: skip
    loud = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert loud.exit_code == 0 and "finetune step 1/2" in loud.stderr, loud.output
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
    assert "wrote" in quiet.stdout  # the result is still printed
    done = runner.invoke(app, ["compress", str(original), "--out", str(tmp_path / "c"),
                               "--keep", "0.01", "--quiet"])  # fmt: skip
    assert done.exit_code == 0 and done.stderr == "", done.output
    assert "recipe:" not in done.stdout and "note:" not in done.stdout and "wrote" in done.stdout
    loud = runner.invoke(app, ["compress", str(original), "--out", str(tmp_path / "d"),
                               "--keep", "0.01"])  # fmt: skip
    assert "recipe:" in loud.stdout and "note:" in loud.stdout  # what --quiet left out


def test_compress_resume_needs_finetune_steps(setup, tmp_path):
    original, _, _ = setup
    done = runner.invoke(app, ["compress", str(original), "--out", str(tmp_path / "x"),
                               "--resume"])  # fmt: skip
    assert done.exit_code == 1 and not (tmp_path / "x").exists()
    assert done.stderr.strip() == (
        "error: --resume continues an interrupted fine-tuning; give --finetune-steps"
    )
