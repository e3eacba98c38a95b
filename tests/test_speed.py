"""`dlnc speed` on tiny models: what it reports (never how fast: timings are for benchmarks/)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import dlnc, one_line_error
from hf_helpers import compressed_export

from compressor.errors import DlncError
from compressor.workflows.speed import SpeedOptions, measure_speed

SHORT = ["--repeats", "1", "--prompt-len", "8", "--context-len", "4", "--new-tokens", "3"]


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    _, out = compressed_export("llama", tmp_path_factory.mktemp("speed"))
    return out, out.parent / "llama-dense"


def test_lm_json_has_both_models_prefill_and_decode(llama_export):
    export, dense = llama_export
    result = dlnc("speed", export, "--against", dense, "--batch", "1,2", "--json", *SHORT)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows["options"]["decode_batches"] == [1, 2]
    for label in ("model", "dense"):
        row = rows[label]
        assert row["kind"] == "causal_lm"
        assert row["prefill_ms"] > 0
        assert sorted(row["decode_tokens_per_s"]) == ["1", "2"]
        assert all(v > 0 for v in row["decode_tokens_per_s"].values())
        assert "forward_ms" not in row
    assert rows["model"]["factorized_layers"] > 0
    assert rows["dense"]["factorized_layers"] == 0
    assert rows["model"]["params"] < rows["dense"]["params"]


def test_lm_table_has_a_speed_up_row(llama_export):
    export, dense = llama_export
    result = dlnc("speed", export, "--against", dense, "--batch", "1", *SHORT)
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.stdout
    assert "decode b1 tok/s" in result.stdout


def test_encoder_is_one_forward_pass(tmp_path):
    _, export = compressed_export("bert", tmp_path)
    rows = measure_speed(export, options=SpeedOptions(repeats=1, prompt_len=8))
    row = rows["model"].to_dict()
    assert list(rows) == ["model"]
    assert row["kind"] == "forward" and row["forward_ms"] > 0
    assert "prefill_ms" not in row and "decode_tokens_per_s" not in row


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "cuda:7"], "--device"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "int3"], "--dtype"),
        (["--repeats", "0"], "--repeats"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--batch", "1,x"], "--batch"),
        (["--batch", "0"], "--batch"),
        (["--prompt-len", "100000"], "--prompt-len"),
    ],
)
def test_bad_options_are_one_line_errors(llama_export, args, needle):
    export, _ = llama_export
    one_line_error(dlnc("speed", export, *SHORT, *args), needle)


def test_options_are_checked_before_any_model_is_loaded(tmp_path):
    with pytest.raises(DlncError, match="`device`"):
        measure_speed(tmp_path / "missing", options=SpeedOptions(device="nowhere"))


def test_compiled_models_get_room_for_their_graphs_while_timed(llama_export, monkeypatch):
    # the models' forwards share one code object: dynamo's recompile limit is raised for the
    # timing (16 graphs a model), then restored; nothing is compiled here (the timer is faked)
    from dataclasses import replace

    import torch

    from compressor.workflows import speed
    from compressor.workflows.finetune import load_model

    export, dense = llama_export
    seen = []

    def fake(timers, repeats):
        seen.append(torch._dynamo.config.recompile_limit)
        return dict.fromkeys(timers, 0.5)

    monkeypatch.setattr(speed, "_alternate", fake)
    before = torch._dynamo.config.recompile_limit
    models = {"model": load_model(export), "dense": load_model(dense)}
    options = SpeedOptions(repeats=1, prompt_len=8, context_len=4, new_tokens=3, compile=True)
    rows = speed.measure_models(models, options)
    assert seen and set(seen) == {max(before, 32)}
    assert torch._dynamo.config.recompile_limit == before
    assert rows["model"].prefill_ms == 500.0
    speed.measure_models(models, replace(options, compile=False))
    assert seen[-1] == before  # not compiling: the limit untouched
