"""Failures found by an adversarial pass over the CLI (issue 14): each gets a one-line error,
writes nothing where it must not, and keeps the user's input as it was."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
import torch
from conftest import tree_snapshot
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from compressor.errors import DlncError

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


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2")[1]


# 1) a config with fewer layers than the weights -------------------------------------------


def test_weights_of_a_layer_the_config_lacks_are_an_error(gpt2, tmp_path):
    edit_config(gpt2, n_layer=1)
    before = tree_snapshot(gpt2)
    result = dlnc("compress", gpt2, "--out", tmp_path / "out")
    one_line_error(result, "not used by the config", "transformer.h.1.")
    assert not (tmp_path / "out").exists() and tree_snapshot(gpt2) == before


def test_a_dropped_head_is_a_notice_not_an_error(tiny_model):
    """bert-base's checkpoint holds a next-sentence head its masked-LM class has no place
    for: that is how it ships, so it loads, and the user is told what was left out."""
    from compressor.io.checkpoint import load_checkpoint

    _, folder = tiny_model("bert")
    state = load_file(folder / "model.safetensors")
    state["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_checkpoint(folder)
    assert any("cls.seq_relationship.weight" in n for n in loaded.notices)


# 2) --out inside the input folder ---------------------------------------------------------


def test_an_output_inside_the_input_folder_is_refused(gpt2):
    before = tree_snapshot(gpt2)
    result = dlnc("compress", gpt2, "--out", gpt2 / "sub")
    one_line_error(result, "inside the input")
    assert not (gpt2 / "sub").exists() and tree_snapshot(gpt2) == before


def test_an_output_beside_a_bare_weights_file_is_still_fine(gpt2):
    from compressor.io.export import check_output_dir

    check_output_dir(gpt2 / "model-dlnc", False, gpt2 / "model.safetensors")  # no error


# 3) every option is checked before any work -----------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Make any checkpoint load fail the test: the error must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    # every module that binds load_checkpoint at import is imported (and patched) before the
    # source is, so none keeps the refusing stand-in after the test
    modules = ("compressor.workflows.compress", "compressor.workflows.estimate",
               "compressor.workflows.plan", "cli.inspect", "compressor.io.checkpoint")  # fmt: skip
    for module in modules:
        monkeypatch.setattr(f"{module}.load_checkpoint", refuse, raising=False)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["compress", "{m}", "--out", "{t}/out", "--plot", "{t}/p.banana"], ["--plot", "banana"]),
        (["compress", "{m}", "--out", "{t}/out", "--plot", "{t}/no/p.png"], ["--plot", "no"]),
        (["compress", "{m}", "--out", "{t}/out", "--max-shard-size", "banana"], ["shard"]),
        (["estimate-ranks", "{m}", "--plot", "{t}/p.banana"], ["--plot", "banana"]),
        (["estimate-ranks", "{m}", "--save", "{t}/no/r.yaml"], ["--save", "no"]),
        (["inspect", "{m}", "--plot", "{t}/p.banana"], ["--plot", "banana"]),
    ],
)
def test_a_bad_option_fails_before_any_work(args, needles, gpt2, tmp_path, no_loading):
    args = [a.format(m=gpt2, t=tmp_path) for a in args]
    result = dlnc(*args)
    one_line_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_warmup_lr_is_checked_by_the_options(gpt2, tmp_path, no_loading):
    data = token_file(tmp_path / "t.safetensors")
    result = dlnc("compress", gpt2, "--out", tmp_path / "out", "--data", data,
                  "--warmup-steps", 2, "--warmup-lr", -1)  # fmt: skip
    one_line_error(result, "--warmup-lr must be > 0")


def test_max_shard_size_is_checked_by_the_options():
    from compressor.options import ExportOptions

    with pytest.raises(DlncError, match="max_shard_size"):
        ExportOptions(max_shard_size="banana")
    ExportOptions(max_shard_size="500MB")


# 4) unwritable outputs --------------------------------------------------------------------


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
    result = dlnc("compress", gpt2, "--out", tmp_path / "out")
    one_line_error(result, str(tmp_path / "out"), cause)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


# 5) calibration and fine-tuning of an encoder-decoder -------------------------------------


def tiny_t5(**overrides):
    import transformers as tf

    torch.manual_seed(0)
    kw = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    kw.update(overrides)
    model = tf.T5ForConditionalGeneration(tf.T5Config(**kw)).eval()
    model.config.architectures = ["T5ForConditionalGeneration"]
    return model


def token_file(path, rows=16, length=12):
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(2, 64, (rows, length), generator=g)}, path)
    return path


def test_t5_calibrates_with_teacher_forcing(tmp_path):
    """The decoder's layers see the text as their input, shifted right (as in fine-tuning)."""
    from compressor.core.targets import find_targets
    from compressor.methods.calibration import collect_grams

    model = tiny_t5()
    ids = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = find_targets(model)
    stats = collect_grams(model, targets, [batch])
    assert set(stats) == set(targets)
    # the decoder's first query projection saw the embeddings of [start, ids[:-1]]
    shifted = torch.cat([torch.zeros(2, 1, dtype=ids.dtype), ids[:, :-1]], 1)
    block = model.decoder.block[0].layer[0]
    x = block.layer_norm(model.decoder.embed_tokens(shifted)).reshape(-1, 32).double()
    torch.testing.assert_close(stats["decoder.block.0.layer.0.SelfAttention.q"].gram, x.T @ x)


def test_t5_whiten_and_estimate_ranks_through_the_cli(tmp_path):
    tiny_t5().save_pretrained(tmp_path / "t5")
    data = token_file(tmp_path / "tokens.safetensors")
    result = dlnc("compress", tmp_path / "t5", "--method", "whiten", "--data", data,
                  "--out", tmp_path / "out", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "whiten"
    result = dlnc("estimate-ranks", tmp_path / "t5", "--data", data, "--json")
    assert result.exit_code == 0, result.output


def test_seq2seq_decoder_inputs_fall_back_to_the_pad_token():
    from compressor.core.tasks import model_inputs

    model = tiny_t5(decoder_start_token_id=None)
    ids = torch.tensor([[5, 6, 7]])
    inputs = model_inputs({"input_ids": ids}, model)
    assert inputs["decoder_input_ids"].tolist() == [[0, 5, 6]]


def test_seq2seq_without_start_or_pad_token_is_a_one_line_error():
    from compressor.core.tasks import model_inputs

    model = tiny_t5(decoder_start_token_id=None, pad_token_id=None)
    with pytest.raises(DlncError, match="decoder_start_token_id"):
        model_inputs({"input_ids": torch.tensor([[5, 6, 7]])}, model)


# 6) ranks files and pickles ---------------------------------------------------------------


def test_a_ranks_file_that_is_not_utf8_is_one_line(gpt2, tmp_path):
    ranks = tmp_path / "ranks.yaml"
    ranks.write_bytes(b"ranks:\n  \xff\xfe: 3\n")
    result = dlnc("compress", gpt2, "--out", tmp_path / "out", "--ranks", ranks)
    one_line_error(result, "ranks.yaml", "UTF-8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("payload", [[1, 2, 3], "exec"])
def test_a_pickle_that_is_not_weights_is_one_line(payload, tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps(Boom() if payload == "exec" else payload))
    result = dlnc("compress", path, "--allow-pickle", "--out", tmp_path / "out")
    one_line_error(result, "weights.bin", "not a weights file")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_a_pickle_beside_a_config_that_is_not_weights_is_one_line(gpt2, tmp_path):
    import pickle

    (gpt2 / "model.safetensors").unlink()
    (gpt2 / "pytorch_model.bin").write_bytes(pickle.dumps({"a": [1, 2]}))
    result = dlnc("compress", gpt2, "--allow-pickle", "--out", tmp_path / "out")
    one_line_error(result, "pytorch_model.bin", "not a weights file")


# 7) an edited `dlnc` section --------------------------------------------------------------


@pytest.fixture
def exported(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    result = dlnc("compress", folder, "--rank", 4, "--out", tmp_path / "exp")
    assert result.exit_code == 0, result.output
    return tmp_path / "exp"


def edit_section(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def first_layer(config) -> dict:
    return next(iter(config["dlnc"]["layers"].values()))


EDITS = {
    "shape": (lambda c: first_layer(c).update(shape=[7, 5]), r"expected .*found"),
    "rank": (lambda c: first_layer(c).update(rank=5), r"rank 5\b.*found"),
    "string": (lambda c: c.update(dlnc="hello"), r"`dlnc` section"),
    "layers-list": (lambda c: c["dlnc"].update(layers=[1, 2]), r"`layers`"),
    "no-shape": (lambda c: first_layer(c).pop("shape"), r"shape"),
    "bad-rank": (lambda c: first_layer(c).update(rank="four"), r"rank"),
    "version": (lambda c: c["dlnc"].update(format_version="x"), r"format_version"),
}


@pytest.mark.parametrize("damage", [*EDITS, "json"])
def test_an_edited_export_is_one_line(damage, exported):
    from compressor.io.export import load_pretrained

    if damage == "json":
        (exported / "config.json").write_text('{"dlnc": ')
        pattern = "not valid JSON"
    else:
        edit, pattern = EDITS[damage]
        edit_section(exported, edit)
    with pytest.raises(DlncError, match=pattern) as info:
        load_pretrained(exported)
    assert "\n" not in str(info.value)
    result = dlnc("eval", exported, "--data", token_file(exported.parent / "t.safetensors"))
    one_line_error(result)


def test_an_edited_shape_names_the_tensor_and_both_shapes(exported):
    from compressor.io.export import load_pretrained

    edit_section(exported, lambda c: first_layer(c).update(rank=5))
    with pytest.raises(DlncError) as info:
        load_pretrained(exported)
    name = next(iter(json.loads((exported / "config.json").read_text())["dlnc"]["layers"]))
    assert re.search(rf"{re.escape(name)}\.(up|down)\.weight", str(info.value))
    assert "[" in str(info.value) and "4" in str(info.value)


# 8) the same architecture at the wrong size -----------------------------------------------


def test_a_wrong_width_names_the_first_mismatched_tensor(gpt2, tmp_path):
    edit_config(gpt2, n_embd=48)
    line = one_line_error(dlnc("compress", gpt2, "--out", tmp_path / "out"), "shape")
    assert "look at the above report" not in line
    assert re.search(r"shape of transformer\.\S+ is \[\d+\] in the weights, \[\d+\] by the", line)


# 9) inspect of a dlnc export --------------------------------------------------------------


def test_inspect_of_an_export_shows_the_factors(exported):
    result = dlnc("inspect", exported, "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    config = json.loads((exported / "config.json").read_text())["dlnc"]["layers"]
    assert {row["name"] for row in layers} == set(config)
    assert all(row["rank"] == 4 and row["numerical_rank"] <= 4 for row in layers)
    text = dlnc("inspect", exported)
    assert text.exit_code == 0 and "rank" in text.stdout


# 10) leftovers and Ctrl-C -----------------------------------------------------------------


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


def test_ctrl_c_in_finetune_exits_130(monkeypatch):
    import typer

    from cli.common import user_errors
    from compressor.training.loop import FinetuneInterrupted

    with pytest.raises(typer.Exit) as info, user_errors():
        raise FinetuneInterrupted("interrupted after step 3/10; state saved to s")
    assert info.value.exit_code == 130


# 11) tables piped to a file keep every column ---------------------------------------------


def test_a_piped_table_keeps_every_column(gpt2, tmp_path):
    result = dlnc("compress", gpt2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "layer" in line)
    assert "rel error" in header and "params after" in header
    assert "transformer.h.0.attn.c_attn" in result.stdout  # names are not folded


# 12) help texts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("compress", "[default: <input>-dlnc beside the input]"),
        ("finetune", "Optimizer steps [recipe]"),
    ],
)
def test_help_texts_keep_their_brackets(command, text):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    flat = " ".join(result.stdout.split())
    assert text in flat
    assert not re.search(r"\w \.(\s|$)", flat)  # "Output folder ." lost its default


def all_params():
    import typer

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")
        for param in command.params:
            yield f"{path} {param.name}", getattr(param, "help", None) or ""

    return list(walk(typer.main.get_command(app), "dlnc"))


def test_no_help_text_loses_text_to_rich_markup():
    """Rich reads `[word]` as a style tag and drops it: every bracket must be escaped."""
    from rich.text import Text

    for where, text in all_params():
        shown = Text.from_markup(text).plain
        assert shown == text.replace("\\[", "["), where


def test_t5_without_a_start_token_fine_tunes():
    """Distillation of a T5 whose config has no decoder_start_token_id (ValueError from
    T5's _shift_right before): the decoder reads the text shifted right after the pad."""
    import copy

    from finetune_helpers import token_batches

    from compressor.core.compress import compress_
    from compressor.core.ranks import RankPolicy
    from compressor.core.targets import find_targets, weight_readers
    from compressor.training.loop import FinetuneConfig, finetune

    teacher = tiny_t5(decoder_start_token_id=None)
    student = copy.deepcopy(teacher)
    targets = find_targets(student)
    for name in weight_readers(student, targets):  # T5's wo reads its .weight: stays dense
        del targets[name]
    compress_(student, targets, RankPolicy(keep=0.5), 2)
    config = FinetuneConfig(steps=2, lr=1e-3, objective="distill", mixed_precision="no")
    result = finetune(student, token_batches(2, length=8), teacher=teacher, config=config)
    assert result.steps == 2
