"""compress -> export -> load_pretrained round trips, on every family and in tensor mode."""

import json

import pytest
import torch
from conftest import FAMILIES, example_inputs, outputs
from safetensors.torch import load_file

from compressor.core.compress import compress_
from compressor.core.layers import FactorizedLinear
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import factorized_layers
from compressor.core.targets import find_targets
from compressor.io.checkpoint import load_checkpoint
from compressor.io.export import default_output_dir, export
from compressor.io.load import load_pretrained


def compressed(folder, policy, depth=2):
    loaded = load_checkpoint(folder)
    report = compress_(loaded.model, find_targets(loaded.model), policy, depth)
    return loaded, report


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_factorization_reproduces_outputs(family, tiny_model):
    model, folder = tiny_model(family)
    loaded = load_checkpoint(folder)
    targets = find_targets(loaded.model)
    full = {n: min(m.weight.shape) for n, m in targets.items()}
    policy = RankPolicy(rank=1, overrides=full, dense_at_breakeven=False)
    compress_(loaded.model, targets, policy, depth=3)
    assert {n: m.rank for n, m in factorized_layers(loaded.model).items()} == full
    inputs = example_inputs(family)
    torch.testing.assert_close(outputs(loaded.model, inputs), outputs(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_load_pretrained_gives_identical_logits(family, tiny_model, tmp_path):
    _, folder = tiny_model(family)
    loaded, report = compressed(folder, RankPolicy(keep=0.5), depth=3)
    out = export(loaded.model, tmp_path / "out", config=loaded.config, report=report.to_dict())
    reloaded = load_pretrained(out)
    inputs = example_inputs(family)
    assert torch.equal(outputs(reloaded, inputs), outputs(loaded.model, inputs))
    ranks = {n: m.rank for n, m in factorized_layers(reloaded).items()}
    assert ranks == {r.name: r.rank for r in report.layers if r.rank is not None}
    assert all(m.depth == 2 for m in factorized_layers(reloaded).values())


def test_sharded_export_reloads_identically(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    loaded, _ = compressed(folder, RankPolicy(rank=4))
    out = export(loaded.model, tmp_path / "out", config=loaded.config, max_shard_size=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    inputs = example_inputs("llama")
    assert torch.equal(outputs(load_pretrained(out), inputs), outputs(loaded.model, inputs))


def test_sharded_input_is_read(tiny_model, tmp_path):
    model, _ = tiny_model("bert")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    loaded = load_checkpoint(sharded)
    inputs = example_inputs("bert")
    torch.testing.assert_close(outputs(loaded.model, inputs), outputs(model, inputs))


def test_export_stores_two_factors_and_a_dlnc_section(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    loaded, _ = compressed(folder, RankPolicy(rank=4), depth=4)
    out = export(loaded.model, tmp_path / "out", config=loaded.config, method="svd")
    state = load_file(out / "model.safetensors")
    name = "transformer.h.0.attn.c_attn"
    assert state[f"{name}.down.weight"].shape == (4, 32)
    assert state[f"{name}.up.weight"].shape == (96, 32 // 8)
    assert not any(".mid." in k for k in state)
    section = json.loads((out / "config.json").read_text())["dlnc"]
    assert section["format_version"] == 1 and section["method"] == "svd"
    assert section["layers"][name] == {
        "rank": 4,
        "shape": [96, 32],
        "layout": "conv1d",
        "bias": True,
    }


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_export_loads_with_plain_transformers(family, tiny_model, tmp_path):
    import transformers

    _, folder = tiny_model(family)
    loaded, _ = compressed(folder, RankPolicy(rank=4))
    out = export(loaded.model, tmp_path / "merged", config=loaded.config, format="dense")
    cls = getattr(transformers, loaded.config.architectures[0])
    plain = cls.from_pretrained(out)
    inputs = example_inputs(family)
    torch.testing.assert_close(outputs(plain, inputs), outputs(loaded.model, inputs))
    assert factorized_layers(loaded.model)  # the in-memory model was not merged


def test_tied_lm_head_stays_tied(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    loaded, _ = compressed(folder, RankPolicy(rank=4))
    reloaded = load_pretrained(export(loaded.model, tmp_path / "o", config=loaded.config))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_tensor_mode_round_trip(tiny_mlp, tmp_path):
    model, path = tiny_mlp
    loaded = load_checkpoint(path)
    assert loaded.tensor_mode and "tensor mode" in loaded.notices[0]
    targets = find_targets(loaded.model)
    assert set(targets) == {"fc1", "fc2"}  # `head` is left alone by name
    compress_(loaded.model, targets, RankPolicy(rank=3))
    reloaded = load_pretrained(export(loaded.model, tmp_path / "out"))
    fc2 = reloaded.get_submodule("fc2")
    assert isinstance(fc2, FactorizedLinear) and fc2.rank == 3
    w = model.fc2.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(
        fc2.dense_weight(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5, rtol=1e-4
    )
    assert torch.equal(reloaded.get_submodule("head").weight, model.head.weight.detach())


def test_half_precision_checkpoint_keeps_its_dtype(tiny_model, tmp_path):
    model, _ = tiny_model("llama")
    half = tmp_path / "half"
    model.to(torch.bfloat16).save_pretrained(half)
    loaded, _ = compressed(half, RankPolicy(rank=4))
    layer = next(iter(factorized_layers(loaded.model).values()))
    assert layer.up.weight.dtype == torch.bfloat16
    reloaded = load_pretrained(export(loaded.model, tmp_path / "o", config=loaded.config))
    assert next(iter(factorized_layers(reloaded).values())).down.weight.dtype == torch.bfloat16


def test_default_output_dir_is_a_sibling(tmp_path):
    f = tmp_path / "model.safetensors"
    f.touch()
    assert default_output_dir(f) == tmp_path / "model-dlnc"
    assert default_output_dir(tmp_path) == tmp_path.parent / f"{tmp_path.name}-dlnc"


def test_tensor_mode_export_loads_into_the_users_own_module(tiny_mlp, tmp_path):
    from conftest import MLP

    _, path = tiny_mlp
    loaded = load_checkpoint(path)
    compress_(loaded.model, find_targets(loaded.model), RankPolicy(rank=16))
    mine = load_pretrained(export(loaded.model, tmp_path / "out"), model=MLP())
    assert isinstance(mine.fc2, FactorizedLinear) and mine.fc2.rank == 16
    t = loaded.model  # the in-memory tensor-mode tree: same layers, no forward of its own
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = t.head(torch.relu(t.fc2(torch.relu(t.fc1(x)))))
        torch.testing.assert_close(mine(x), expected)


@pytest.mark.parametrize("damage", ["no-config", "no-section", "wrong-rank"])
def test_load_pretrained_refuses_a_damaged_export(damage, tiny_model, tmp_path):
    from compressor.errors import DlncError

    _, folder = tiny_model("bert")
    loaded, _ = compressed(folder, RankPolicy(rank=4))
    out = export(loaded.model, tmp_path / "out", config=loaded.config)
    config = json.loads((out / "config.json").read_text())
    if damage == "no-config":
        (out / "config.json").unlink()
    elif damage == "no-section":
        del config["dlnc"]
        (out / "config.json").write_text(json.dumps(config))
    else:
        first = next(iter(config["dlnc"]["layers"]))
        config["dlnc"]["layers"][first]["rank"] = 5
        (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DlncError, match=r"config|dlnc"):
        load_pretrained(out)
