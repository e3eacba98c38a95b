"""`dlnc compress` and `dlnc inspect` through the CLI: results, and every bad input."""

import json

import pytest
import torch
from conftest import build_tiny, example_inputs, outputs, tree_snapshot
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from compressor.core.surgery import factorized_layers
from compressor.core.targets import find_targets
from compressor.io.load import load_pretrained

runner = CliRunner()


def dlnc(*args):
    return runner.invoke(app, [str(a) for a in args])


def plant_rank(model, rank):
    """Make every targeted weight exactly rank `rank`."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in find_targets(model).values():
            a, b = module.weight.shape
            module.weight.copy_(
                torch.randn(a, rank, generator=g) @ torch.randn(rank, b, generator=g)
            )
    return model


def test_version():
    result = dlnc("--version")
    assert result.exit_code == 0 and result.output.startswith("dlnc 0.")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exact_rank_k_model_is_reproduced_through_the_cli(family, tmp_path):
    model = plant_rank(build_tiny(family), 3)
    model.save_pretrained(tmp_path / "in")
    result = dlnc("compress", tmp_path / "in", "--rank", 3, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert all(r["rank"] == 3 and r["rel_error"] < 1e-5 for r in report["layers"])
    reloaded = load_pretrained(tmp_path / "out")
    assert len(factorized_layers(reloaded)) == len(report["layers"])
    inputs = example_inputs(family)
    torch.testing.assert_close(
        outputs(reloaded, inputs), outputs(model, inputs), atol=2e-5, rtol=1e-4
    )


def test_default_output_beside_a_bare_file_and_the_report(tiny_model):
    _, folder = tiny_model("bert")
    before = tree_snapshot(folder)
    result = dlnc("compress", folder / "model.safetensors")
    assert result.exit_code == 0, result.output
    out = folder / "model-dlnc"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["targeted_params_after"] <= 0.5 * report["targeted_params_before"]
    assert report["bytes_after"] < report["bytes_before"]
    assert "targeted layers" in report["notes"]["targeted_keep"]
    assert "totals" in result.output and "wrote" in result.output
    after = tree_snapshot(folder)
    assert {k: v for k, v in after.items() if not k.startswith("model-dlnc")} == before


def test_terminal_table_and_json_report_agree(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    result = dlnc("compress", folder, "--energy", "0.8", "--out", tmp_path / "o", "--json")
    report = json.loads(result.output)
    on_disk = json.loads((tmp_path / "o" / "report.json").read_text())
    assert {k: v for k, v in report.items() if k != "out_dir"} == on_disk
    assert report["policy"]["energy"] == 0.8


def test_tokenizer_side_files_are_copied(tiny_model, tmp_path):
    _, folder = tiny_model("bert")
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text("{}")
    (folder / "notes.txt").write_text("unrelated")
    assert dlnc("compress", folder, "--rank", 4, "--out", tmp_path / "o").exit_code == 0
    copied = {p.name for p in (tmp_path / "o").iterdir()}
    assert {"vocab.txt", "1_Pooling"} <= copied and "notes.txt" not in copied


def test_merge_flag_exports_dense_weights(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    assert dlnc("compress", folder, "--rank", 4, "--merge", "--out", tmp_path / "o").exit_code == 0
    state = load_file(tmp_path / "o" / "model.safetensors")
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout


def test_inspect_prints_statistics_json_and_a_plot(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    result = dlnc("inspect", folder, "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert len(layers) == 10  # the llama recipe's targets: grouped-query k/v stay dense
    q = next(r for r in layers if r["name"].endswith("q_proj"))
    assert q["shape"] == [32, 32] and q["breakeven_rank"] == pytest.approx(32 * 32 / 64)
    assert 1 <= q["energy_rank_90"] <= q["energy_rank_99"] <= 32
    every = dlnc("inspect", folder, "--json", "--recipe", "generic")  # every dense layer
    k = next(r for r in json.loads(every.output)["layers"] if r["name"].endswith("k_proj"))
    assert k["shape"] == [16, 32] and k["breakeven_rank"] == pytest.approx(32 * 16 / 48)
    png = tmp_path / "spectra.png"
    assert dlnc("inspect", folder, "--plot", png).exit_code == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_reads_the_layers_compress_targets(tiny_model, tmp_path):
    # the recipe's targets (gpt2: c_attn, c_proj, c_fc; include given: only those) are the
    # layers inspect reads, as compress reads them; inspect once ignored the recipe
    _, folder = tiny_model("llama")
    recipe = tmp_path / "mlp.yaml"
    recipe.write_text("name: mlp\ntargets: {include: [gate_proj, up_proj, down_proj]}\n")
    inspected = dlnc("inspect", folder, "--json", "--recipe", recipe)
    assert inspected.exit_code == 0, inspected.output
    compressed = dlnc("compress", folder, "--json", "--recipe", recipe, "-o", tmp_path / "o")
    names = [r["name"] for r in json.loads(inspected.output)["layers"]]
    assert names == [r["name"] for r in json.loads(compressed.output)["layers"]]
    assert {n.rsplit(".", 1)[1] for n in names} == {"gate_proj", "up_proj", "down_proj"}
    given = dlnc("inspect", folder, "--json", "--recipe", recipe, "--include", "up_proj")
    assert {r["name"].rsplit(".", 1)[1] for r in json.loads(given.output)["layers"]} == {"up_proj"}


def test_tensor_mode_is_announced(tiny_mlp, tmp_path):
    _, path = tiny_mlp
    result = dlnc("compress", path, "--rank", 3, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "tensor mode" in result.output


def _write_bad(kind, tmp_path, tiny_model):
    """Make a bad input of the given kind; returns (path, extra args)."""
    if kind == "missing":
        return tmp_path / "nope.safetensors", []
    if kind == "not-safetensors":
        p = tmp_path / "model.txt"
        p.write_text("hello")
        return p, []
    if kind == "pickle":
        p = tmp_path / "model.bin"
        torch.save({"w": torch.zeros(2, 2)}, p)
        return p, []
    _, folder = tiny_model("gpt2")
    weights = folder / "model.safetensors"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "config-mismatch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["n_embd"] = 64
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "unknown-arch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "no-such-model"
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "nan":
        state = load_file(weights)
        state["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
        save_file(state, weights, metadata={"format": "pt"})
    elif kind in ("rank-0", "rank-too-big", "keep-too-big"):
        return folder, {"rank-0": ["--rank", 0], "rank-too-big": ["--rank", 33],
                        "keep-too-big": ["--keep", 1.5]}[kind]  # fmt: skip
    elif kind == "existing-output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    return folder, []


BAD = {
    "missing": "no such file",
    "not-safetensors": "not a safetensors file",
    "pickle": "pickle",
    "truncated": "not a valid safetensors file",
    "config-mismatch": "do not match the config",
    "unknown-arch": "unknown architecture",
    "nan": "NaN or Inf",
    "rank-0": "`rank` must be >= 1",
    "rank-too-big": "out of range",
    "keep-too-big": "`keep` must be in (0, 1)",
    "existing-output": "already exists",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_input_one_line_error_nonzero_exit_nothing_written(kind, tmp_path, tiny_model):
    path, extra = _write_bad(kind, tmp_path, tiny_model)
    watched = path.parent if path.exists() else tmp_path
    before = tree_snapshot(watched)
    out = tmp_path / "out"
    result = dlnc("compress", path, "--out", out, *extra)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert BAD[kind] in lines[0]
    assert "Traceback" not in result.output
    assert tree_snapshot(watched) == before  # the input is untouched
    if kind == "existing-output":
        assert (out / "keep.txt").read_text() == "mine"
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no half-written export left


def test_pickle_is_accepted_when_allowed(tmp_path):
    model = build_tiny("gpt2")
    folder = tmp_path / "in"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.to_json_file(folder / "config.json")
    refused = dlnc("compress", folder, "--out", tmp_path / "o")
    assert refused.exit_code == 1 and "--allow-pickle" in refused.stderr
    allowed = dlnc("compress", folder, "--allow-pickle", "--rank", 4, "--out", tmp_path / "o")
    assert allowed.exit_code == 0, allowed.output
    inputs = example_inputs("gpt2")
    reloaded = load_pretrained(tmp_path / "o")
    assert outputs(reloaded, inputs).shape == outputs(model, inputs).shape


def test_overwrite_replaces_an_existing_output(tiny_model, tmp_path):
    _, folder = tiny_model("bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = dlnc("compress", folder, "--rank", 4, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_the_input_is_refused(tiny_model):
    _, folder = tiny_model("bert")
    result = dlnc("compress", folder, "--out", folder, "--overwrite")
    assert result.exit_code == 1 and "replace the input" in result.stderr
    assert (folder / "model.safetensors").is_file()


def test_terminal_table_shows_the_numbers_of_report_json(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    out = tmp_path / "o"
    result = runner.invoke(
        app, ["compress", str(folder), "--keep", "0.4", "--out", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {
        cells[0]: cells
        for line in result.output.splitlines()
        if line.startswith("│")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }
    for layer in report["layers"]:
        cells = rows[layer["name"]]
        assert cells[2] == ("dense" if layer["rank"] is None else str(layer["rank"]))
        assert float(cells[6]) == pytest.approx(layer["rel_error"], abs=5e-5)
    kept = report["targeted_params_after"] / report["targeted_params_before"]
    assert f"{kept:.3f}" in rows["targeted weights"]


def test_bare_weights_file_with_config_given_elsewhere(tiny_model, tmp_path):
    _, folder = tiny_model("gpt2")
    bare = tmp_path / "weights" / "gpt2-small-thing.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((folder / "model.safetensors").read_bytes())
    out = tmp_path / "o"
    no_config = dlnc("compress", bare, "--rank", 4, "--out", out, "--json")
    assert json.loads(no_config.output)["tensor_mode"] is True  # no config.json beside it
    result = dlnc("compress", bare, "--config", folder / "config.json", "--rank", 4,
                  "--out", out, "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.output
    reloaded = load_pretrained(out)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    assert outputs(reloaded, example_inputs("gpt2")).shape == (2, 12, 64)


def test_stream_and_device_flags(tiny_model, tmp_path):
    _, folder = tiny_model("llama")
    streamed = dlnc("compress", folder, "-o", tmp_path / "a", "--rank", 4, "--device", "cpu")
    memory = dlnc("compress", folder, "-o", tmp_path / "b", "--rank", 4, "--no-stream")
    assert streamed.exit_code == 0 and memory.exit_code == 0, streamed.output + memory.output
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    bad = dlnc(
        "compress", folder, "-o", tmp_path / "c", "--stream", "--method", "dynamics",
        "--reference", folder,
    )  # fmt: skip
    assert bad.exit_code == 1
    assert "error: --stream works without fine-tuning, with method svd or whiten" in bad.output
    assert not (tmp_path / "c").exists()


def test_streamed_whiten_is_output_aware_as_in_memory(tiny_model, tmp_path):
    from safetensors.torch import save_file

    _, folder = tiny_model("llama")
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(1, 64, (8, 10))}, data)
    args = ("compress", folder, "--data", data, "--keep", 0.5, "--json")
    # output-aware ranks are on by default: streamed, block by block, the in-memory export
    # (the correction too, which the llama recipe leaves off unless asked)
    runs = {
        flag: dlnc(*args, flag, "--correct", "-o", tmp_path / flag)
        for flag in ("--stream", "--no-stream")
    }
    assert all(r.exit_code == 0 for r in runs.values()), [r.output for r in runs.values()]
    a, b = (load_file(tmp_path / flag / "model.safetensors") for flag in runs)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads(runs["--stream"].output)
    # 7 x 10 tokens (one of 8 samples held out) are too few to refit any layer: it says so
    assert report["method"] == "whiten" and report["correction"]["tokens"] == 70
    assert report["correction"]["refit"] == []
    plain = dlnc(*args, "--stream", "--no-output-aware", "-o", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    assert "correction" not in json.loads(plain.output)  # the recipe's default
    ranks = [[r["rank"] for r in json.loads(x.output)["layers"]] for x in (runs["--stream"], plain)]
    assert ranks[0] != ranks[1]  # the gains chose the ranks


def test_messages_name_the_flags_of_the_command_that_failed():
    # the flags are read from the Typer app, so a new option needs no list kept by hand
    from cli.common import as_flags

    assert as_flags("`warmup_steps` must be > 0", "compress") == "--warmup-steps must be > 0"
    assert as_flags("pass `correct` off", "compress") == "pass --correct off"
    assert as_flags("`steps` must be >= 1", "compress") == "--finetune-steps must be >= 1"
    assert as_flags("`steps` must be >= 1", "finetune") == "--steps must be >= 1"
    assert as_flags("give `teacher`", "compress") == "give `teacher`"  # not a compress flag
    assert as_flags("give `teacher`", "eval") == "give --teacher"
    assert as_flags("`keep` must be in (0, 1]") == "`keep` must be in (0, 1]"  # no command


# moved from test_hardening.py: options checked before work, T5, inspect of an export, piped tables


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
    from cli_helpers import one_line_error

    args = [a.format(m=gpt2, t=tmp_path) for a in args]
    result = dlnc(*args)
    one_line_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_warmup_lr_is_checked_by_the_options(gpt2, tmp_path, no_loading):
    from cli_helpers import one_line_error, token_file

    data = token_file(tmp_path / "t.safetensors")
    result = dlnc("compress", gpt2, "--out", tmp_path / "out", "--data", data,
                  "--warmup-steps", 2, "--warmup-lr", -1)  # fmt: skip
    one_line_error(result, "--warmup-lr must be > 0")


def test_t5_whiten_and_estimate_ranks_through_the_cli(tmp_path):
    from cli_helpers import token_file

    build_tiny("t5").save_pretrained(tmp_path / "t5")
    data = token_file(tmp_path / "tokens.safetensors")
    result = dlnc("compress", tmp_path / "t5", "--method", "whiten", "--data", data,
                  "--out", tmp_path / "out", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "whiten"
    result = dlnc("estimate-ranks", tmp_path / "t5", "--data", data, "--json")
    assert result.exit_code == 0, result.output


def test_inspect_of_an_export_shows_the_factors(exported):
    result = dlnc("inspect", exported, "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    config = json.loads((exported / "config.json").read_text())["dlnc"]["layers"]
    assert {row["name"] for row in layers} == set(config)
    assert all(row["rank"] == 4 and row["numerical_rank"] <= 4 for row in layers)
    text = dlnc("inspect", exported)
    assert text.exit_code == 0 and "rank" in text.stdout


def test_a_piped_table_keeps_every_column(gpt2, tmp_path):
    result = dlnc("compress", gpt2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "layer" in line and not line.startswith("note"))
    assert "rel error" in header and "params after" in header
    assert "transformer.h.0.attn.c_attn" in result.stdout  # names are not folded


def test_a_keep_below_rank_one_everywhere_says_what_was_kept(gpt2, tmp_path):
    """--keep 0.01 cannot be met (rank 1 in every layer keeps 0.04 of the tiny GPT-2's
    targeted weights): it used to drop every layer to rank 1 without a word."""
    for stream in ([], ["--stream"]):
        out = tmp_path / f"out{len(stream)}"
        result = dlnc("compress", gpt2, "--keep", 0.01, "--no-generate", "--out", out, *stream)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert {r["rank"] for r in report["layers"]} == {1}
        kept = report["targeted_keep"]
        said = "--keep 0.01 is below rank 1 in every layer: every targeted layer is at rank 1"
        assert f"{said}, which keeps {kept:.3f} of the targeted weights" in " ".join(
            result.output.split()
        )
    result = dlnc("compress", gpt2, "--keep", 0.2, "--no-generate", "--out", tmp_path / "o")
    assert result.exit_code == 0 and "below rank 1" not in result.output
