"""`dlnc estimate-ranks` and the data-aware `dlnc compress` options, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from compressor.errors import DlncError
from compressor.io.rankfile import load_ranks

runner = CliRunner()


@pytest.fixture
def gpt2_with_data(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    data = tmp_path / "ids.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(1, 64, (24, 12), generator=g)}, data)
    return folder, data


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_estimate_json_has_every_reading(gpt2_with_data, tmp_path):
    folder, data = gpt2_with_data
    result = run("estimate-ranks", folder, "--data", data, "--warmup-steps", "3", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"] == "dynamics" and out["info"]["samples"] == 24
    for layer in out["layers"]:
        assert {"spectrum_rank", "whiten_rank", "dynamics_rank", "chosen", "breakeven"} <= set(
            layer
        )
        assert layer["whiten_rank"] is not None and layer["dynamics_rank"] is not None


def test_saved_ranks_drive_compress(gpt2_with_data, tmp_path):
    folder, data = gpt2_with_data
    ranks_file, plot = tmp_path / "ranks.yaml", tmp_path / "spectra.png"
    result = run(
        "estimate-ranks", folder, "--data", data, "--method", "whiten", "--keep", "0.4",
        "--save", ranks_file, "--plot", plot,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 0
    saved = load_ranks(ranks_file)
    out = tmp_path / "out"
    result = run("compress", folder, "-o", out, "--ranks", ranks_file, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    written = {r["name"]: r["rank"] for r in report["layers"]}
    assert written == {n: r for n, r in saved.items() if r is not None}


@pytest.mark.parametrize(
    ("extra", "method"),
    [(["--data", "DATA"], "whiten"), (["--data", "DATA", "--warmup-steps", "2"], "dynamics")],
)
def test_compress_with_data(gpt2_with_data, tmp_path, extra, method):
    folder, data = gpt2_with_data
    args = [data if a == "DATA" else a for a in extra]
    result = run("compress", folder, "-o", tmp_path / "out", *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == method
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dlnc"]["method"] == method


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "whiten"], "--method whiten needs calibration data: give --data"),
        (["--method", "dynamics"], "--method dynamics needs --reference"),
        (["--method", "fancy"], "--method must be one of"),
        (["--data", "MISSING"], "no such data file"),
        (["--data", "TEXT"], "no tokenizer found; pass --tokenizer"),
        (["--warmup-steps", "3"], "--warmup-steps trains on data: give --data"),
    ],
)
def test_data_errors_are_one_line(gpt2_with_data, tmp_path, args, message):
    folder, _ = gpt2_with_data
    (tmp_path / "text.txt").write_text("a sample\nanother\n")
    subst = {"MISSING": tmp_path / "nope.txt", "TEXT": tmp_path / "text.txt"}
    args = [subst.get(a, a) for a in args]
    for command in (["estimate-ranks", folder], ["compress", folder, "-o", tmp_path / "o"]):
        result = run(*command, *args)
        assert result.exit_code == 1
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bert_encoder_without_head_warms_up_by_denoising(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, vocab_size=64)  # fmt: skip
    BertModel(cfg).save_pretrained(tmp_path / "enc")
    save_file({"input_ids": torch.randint(1, 64, (4, 8))}, tmp_path / "ids.safetensors")
    result = run("estimate-ranks", tmp_path / "enc", "--data", tmp_path / "ids.safetensors",
                 "--warmup-steps", "2")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "dynamics" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("ranks: {a: 0}", "must be an integer >= 1 or `dense`"),
        ("rank: {a: 3}", "expected a mapping with a `ranks:` section"),
        ("ranks: {a: 3}\nkep: 0.5", "unknown key `kep`"),
        ("ranks: [", "not valid YAML"),
    ],
)
def test_bad_ranks_file(tiny_model, tmp_path, content, message):
    """`dlnc compress --ranks` with a bad ranks file: one line naming the file and what is
    wrong (the library's message), exit 1, no output folder."""
    _, folder = tiny_model("gpt2")
    f = tmp_path / "r.yaml"
    f.write_text(content)
    with pytest.raises(DlncError, match=message):
        load_ranks(f)
    result = run("compress", folder, "--ranks", f, "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(f) in lines[0] and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_compress_refits_the_layers_the_data_can_fit(tiny_model, tmp_path):
    # 84 x 12 = 1008 calibration tokens (12 of the 96 samples held out to measure perplexity):
    # enough for the 32-wide inputs (16 per feature: 512), not for the 128-wide MLP output
    # projections (2048)
    _, folder = tiny_model("gpt2")
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(1, 64, (96, 12), generator=torch.Generator())}, data)
    args = ("compress", folder, "--data", data, "--keep", "0.5", "--json")
    report = json.loads(run(*args, "-o", tmp_path / "on").stdout)
    off = json.loads(run(*args, "-o", tmp_path / "off", "--no-correct").stdout)
    assert "correction" not in off
    correction, layers = report["correction"], {r["name"]: r for r in report["layers"]}
    wide = {n for n, r in layers.items() if r["rank"] and r["shape"][1] == 128}
    few = {n for n, why in correction["skipped"].items() if why.endswith("needed")}
    assert wide and few == wide
    assert correction["skipped"][min(wide)] == "1008 calibration tokens, 2048 needed"
    narrow = {n for n, r in layers.items() if r["rank"]} - wide  # refit, or failed the check
    assert (
        correction["refit"]
        and set(correction["refit"]) | set(correction["skipped"]) - few == narrow
    )
    assert any(n.startswith("error-correcting calibration refit") for n in report["notices"])
    on, off = (load_file(tmp_path / d / "model.safetensors") for d in ("on", "off"))
    for key in on:  # the refit layers' factors changed, every other tensor did not
        refit = key.rsplit(".", 2)[0] in correction["refit"] and key.endswith("weight")
        assert torch.equal(on[key], off[key]) != refit, key
