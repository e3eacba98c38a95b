"""Loading the user's checkpoint: folders, bare files, shards, tensor mode, and clean errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from cli_helpers import dlnc, edit_config, one_line_error
from conftest import MLP, build_tiny, example_inputs, outputs, tree_snapshot
from safetensors.torch import load_file, save_file

from compressor.errors import DlncError
from compressor.io.checkpoint import load_checkpoint, read_state_dict
from compressor.io.tensor_model import TensorModel


def test_a_folder_loads_the_same_model(tmp_path):
    model = build_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.model_type == "llama" and not loaded.tensor_mode
    inputs = example_inputs("llama")
    torch.testing.assert_close(outputs(loaded.model, inputs), outputs(model, inputs))


def test_sharded_weights_load_like_one_file(tmp_path):
    model = build_tiny("gpt2")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    one, shards = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "shards")
    assert len(shards.weight_files) > 1
    inputs = example_inputs("gpt2")
    torch.testing.assert_close(outputs(one.model, inputs), outputs(shards.model, inputs))


def test_a_bare_file_without_config_is_tensor_mode(tmp_path):
    torch.manual_seed(0)
    state = MLP().state_dict()
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert loaded.tensor_mode and isinstance(loaded.model, TensorModel)
    assert any("tensor mode" in n for n in loaded.notices)
    torch.testing.assert_close(loaded.model.fc1.weight, state["fc1.weight"])


def test_a_bare_file_with_a_given_config(tmp_path):
    model = build_tiny("bert")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "w.safetensors"
    (tmp_path / "m" / "model.safetensors").rename(weights)
    loaded = load_checkpoint(weights, config=tmp_path / "m" / "config.json")
    assert loaded.model_type == "bert"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing", None, "no such file or folder"),
        ("x.txt", b"x", "not a safetensors file"),
        ("m.bin", b"x", "is a pickle file"),
        ("b.safetensors", b"junk", "not a valid safetensors file"),
    ],
)
def test_bad_inputs_are_one_error(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DlncError, match=message):
        load_checkpoint(tmp_path / name)


def test_an_unknown_architecture_suggests_tensor_mode(tmp_path):
    torch.manual_seed(0)
    save_file(MLP().state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(DlncError, match=r"unknown architecture.*`tensor_mode`"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, tensor_mode=True).tensor_mode


def test_read_state_dict_reads_every_file(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "2.safetensors")
    state = read_state_dict([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
    assert set(state) == {"a", "b"}


# user errors found by an adversarial pass over the CLI (issue 14)


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


def test_a_wrong_width_names_the_first_mismatched_tensor(gpt2, tmp_path):
    edit_config(gpt2, n_embd=48)
    line = one_line_error(dlnc("compress", gpt2, "--out", tmp_path / "out"), "shape")
    assert "look at the above report" not in line
    assert re.search(r"shape of transformer\.\S+ is \[\d+\] in the weights, \[\d+\] by the", line)


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


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache in tmp_path holding acme/tiny at two commits: a GPT-2 on `main`,
    a Llama at the other commit (the cache's layout: refs/main -> snapshots/<commit>/)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    for commit, family in (("a" * 40, "gpt2"), ("b" * 40, "llama")):
        build_tiny(family).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import
    monkeypatch.chdir(tmp_path)
    return repo


def test_a_hub_name_compresses_from_the_local_cache(hub_cache, tmp_path):
    from huggingface_hub import ModelCard

    done = dlnc("compress", "acme/tiny", "--keep", "0.5", "--no-generate", "--json")
    assert done.exit_code == 0, done.output
    out = tmp_path / "tiny-dlnc"  # in the working folder, not in the cache
    assert json.loads(done.stdout)["out_dir"] == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["dlnc"]["base_model"] == "acme/tiny"
    assert ModelCard.load(out / "README.md").data.base_model == "acme/tiny"
    assert not list(hub_cache.glob("snapshots/*-dlnc"))

    done = dlnc("compress", "acme/tiny", "--revision", "b" * 40, "--keep", "0.5",
                "--no-generate", "--out", tmp_path / "other")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "other" / "config.json").read_text())["model_type"] == "llama"
    done = dlnc("inspect", "acme/tiny", "--revision", "b" * 40, "--json")
    assert done.exit_code == 0, done.output
    assert any("mlp.gate_proj" in row["name"] for row in json.loads(done.stdout)["layers"])


def test_a_hub_name_is_read_by_every_command_that_loads_a_model(hub_cache, tmp_path):
    """finetune, eval, speed and onnx read models through one loader, which resolves names."""
    done = dlnc("compress", "acme/tiny", "--keep", "0.5", "--no-generate")
    assert done.exit_code == 0, done.output
    short = ["--repeats", "1", "--prompt-len", "8", "--context-len", "4", "--new-tokens", "3"]
    done = dlnc("speed", tmp_path / "tiny-dlnc", "--against", "acme/tiny", "--json", *short)
    assert done.exit_code == 0, done.output
    assert set(json.loads(done.stdout)) >= {"model", "dense"}
    done = dlnc("speed", tmp_path / "tiny-dlnc", "--against", "acme/gone", *short)
    one_line_error(done, "acme/gone", "not in the local Hugging Face cache")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["acme/missing"], ["acme/missing", "not in the local Hugging Face cache"]),
        (["acme/tiny", "--revision", "v9"], ["at revision v9", "hf download acme/tiny"]),
        (["hub", "--revision", "main"], ["--revision picks a snapshot of a Hub name"]),
    ],
)
def test_a_name_not_in_the_cache_is_a_one_line_error(hub_cache, tmp_path, args, needles):
    done = dlnc("compress", *args, "--keep", "0.5", "--out", tmp_path / "out")
    one_line_error(done, *needles)
    assert not (tmp_path / "out").exists()
