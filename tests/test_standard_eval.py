"""Standard evaluation: windowed perplexity equals a hand computation, and lm-eval runs a local
task (a YAML over a local JSONL file) on an export, its accuracy equal to scoring by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from hf_helpers import WORDS, compressed_export

from compressor.errors import DlncError
from compressor.training.perplexity import window_perplexity
from compressor.workflows.standard_eval import (
    StandardEvalOptions,
    run_tasks,
    standard_eval,
    text_perplexity,
)


def hand_perplexity(model, ids, seq_len):
    """exp(mean over every window's next-token predictions of -log p), one window at a time."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = ids[start : start + seq_len]
        with torch.no_grad():
            logp = model(input_ids=window[None]).logits[0].log_softmax(-1)
        for t in range(seq_len - 1):
            nll -= logp[t, window[t + 1]].item()
            count += 1
    return math.exp(nll / count), count


def test_window_perplexity_equals_a_hand_computation(tmp_path, one_torch_thread):
    compressed, _ = compressed_export("gpt2", tmp_path)
    ids = torch.randint(1, 64, (2 * 8 + 3,), generator=torch.Generator().manual_seed(3))
    result = window_perplexity(compressed, ids, seq_len=8, batch_size=2)
    expected, count = hand_perplexity(compressed, ids, 8)
    assert result.windows == 2 and result.tokens_dropped == 3 and result.tokens_predicted == count
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert "non-overlapping windows of 8 tokens" in result.protocol
    assert "last 3 tokens" in result.protocol


def test_text_perplexity_of_an_export(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path, tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % 60] for i in range(7 * 10 + 4)))
    result = text_perplexity(out, text, seq_len=10)
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    ids = tf.AutoTokenizer.from_pretrained(out)(text.read_text(), return_tensors="pt").input_ids[0]
    assert result.windows == 7 and result.tokens_dropped == 4
    assert result.perplexity == pytest.approx(hand_perplexity(model, ids, 10)[0], rel=1e-5)
    with pytest.raises(DlncError, match="`seq_len`"):
        text_perplexity(out, text, seq_len=1000)


def test_perplexity_refuses_a_masked_lm(tmp_path):
    _, out = compressed_export("bert", tmp_path, tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3 w4")
    with pytest.raises(DlncError, match="causal language model"):
        text_perplexity(out, text, seq_len=2)


DOCS = [
    {"context": "w1 w2 w3", "choices": ["w4", "w5"], "label": 0},
    {"context": "w7 w8", "choices": ["w9", "w10", "w11"], "label": 2},
    {"context": "w20 w21 w22 w23", "choices": ["w24", "w2"], "label": 1},
    {"context": "w30", "choices": ["w31", "w32"], "label": 0},
]


def local_task(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    yaml = folder / "tiny_choice.yaml"
    yaml.write_text(
        "task: dlnc_tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return yaml


def hand_accuracy(model, tokenizer):
    right = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            ctx = tokenizer(doc["context"]).input_ids
            full = tokenizer(doc["context"] + " " + choice).input_ids
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
            scores.append(sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_lm_eval_runs_a_local_task_on_an_export(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _, out = compressed_export("llama", tmp_path, tokenizer=True)
    results = run_tasks(out, [str(local_task(tmp_path))])
    acc = results["dlnc_tiny_choice"]["acc"]
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert acc == pytest.approx(hand_accuracy(model, tf.AutoTokenizer.from_pretrained(out)))


def test_an_unknown_task_is_a_clean_error(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("nothing: here\n")
    with pytest.raises(DlncError, match="no `task:` name"):
        run_tasks(tmp_path, [str(yaml)])


def test_cli_eval_reports_perplexity_with_its_protocol_and_tasks(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _, out = compressed_export("llama", tmp_path, tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % 60] for i in range(34)))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(out), "--data", str(text), "--seq-len", "8"])
    assert result.exit_code == 0, result.output
    expected = text_perplexity(out, text, seq_len=8).perplexity
    shown = re.search(r"perplexity ([0-9.]+) over 4 windows", result.output)
    assert shown and float(shown.group(1)) == pytest.approx(expected, rel=1e-5)
    assert "protocol: non-overlapping windows of 8 tokens; the last 2 tokens" in result.output
    args = ["eval", str(out), "--tasks", str(local_task(tmp_path)), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["tasks"]["dlnc_tiny_choice"]["acc"] <= 1
    result = runner.invoke(app, ["eval", str(out), "--seq-len", "8"])
    assert (
        result.exit_code == 1 and result.stderr.strip() == "error: --seq-len needs --data TEXT_FILE"
    )


def test_missing_harness_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(DlncError, match=r"pip install 'dlnc\[eval\]'"):
        run_tasks(tmp_path, ["hellaswag"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("device", "tpu", "`device` must be cpu, cuda, cuda:N or mps, got 'tpu'"),
        ("device", "cuda:99", "`device` 'cuda:99'"),
        ("dtype", "float8", "`dtype` must be one of auto, float32, bfloat16, float16"),
        ("limit", 0, "`limit` must be a number of docs >= 1 or a fraction in (0, 1), got 0"),
        ("limit", -2, "`limit` must be"),
        ("limit", 2.5, "`limit` must be"),
        ("num_fewshot", -1, "`num_fewshot` must be >= 0, got -1"),
        ("batch_size", 0, "`batch_size` must be >= 1, got 0"),
    ],
)
def test_every_option_is_checked_when_made(field, value, message):
    with pytest.raises(DlncError) as info:
        StandardEvalOptions(**{field: value})
    assert message in str(info.value)


def test_an_output_path_that_cannot_be_written_is_refused_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DlncError, match="is not a folder"):
        StandardEvalOptions(output_path=blocker / "results")


def test_perplexity_runs_in_the_dtype_asked_for(tmp_path, one_torch_thread):
    _, out = compressed_export("llama", tmp_path, tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % 60] for i in range(6 * 8)))
    result = text_perplexity(out, text, seq_len=8, dtype="bfloat16", device="cpu")
    model = tf.AutoModelForCausalLM.from_pretrained(out).to(torch.bfloat16)
    ids = tf.AutoTokenizer.from_pretrained(out)(text.read_text(), return_tensors="pt").input_ids[0]
    assert result.perplexity == window_perplexity(model, ids, 8).perplexity
    assert result.perplexity != text_perplexity(out, text, seq_len=8).perplexity


def test_lm_eval_flags_and_its_results_file(tmp_path, one_torch_thread, monkeypatch):
    """--limit, --num-fewshot and --output-path reach lm-eval; the file has lm-eval's layout
    (results, configs, versions, n-shot, ...) where its own --output_path puts it."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _, out = compressed_export("llama", tmp_path, tokenizer=True)
    options = StandardEvalOptions(dtype="float32", limit=2, num_fewshot=1,
                                  output_path=tmp_path / "lm-eval")  # fmt: skip
    rows = standard_eval(out, tasks=[str(local_task(tmp_path))], options=options)
    written = Path(rows["results_file"])
    assert written.parent == tmp_path / "lm-eval" / re.sub(r"[\"<>:/|\\?*\[\]]+", "__", str(out))
    assert re.fullmatch(r"results_.*\.json", written.name)
    saved = json.loads(written.read_text())
    assert {"results", "configs", "versions", "n-shot", "n-samples", "config"} <= set(saved)
    task = "dlnc_tiny_choice"
    assert saved["results"][task]["acc,none"] == rows["tasks"][task]["acc"]
    assert saved["n-shot"][task] == 1 and saved["configs"][task]["num_fewshot"] == 1
    assert saved["n-samples"][task] == {"original": 4, "effective": 2}
    assert saved["config"]["limit"] == 2 and saved["model_name"] == str(out)


def test_cli_eval_checks_its_options_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    _, out = compressed_export("gpt2", tmp_path, tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % 60] for i in range(100)))
    runner = CliRunner()
    cases = [
        (["--seq-len", "33"], "error: --seq-len 33 is longer than the model's 32 positions; "
                              "give at most 32"),
        (["--seq-len", "8", "--dtype", "half"], "error: --dtype must be one of auto, float32, "
                                                "bfloat16, float16, got 'half'"),
        (["--seq-len", "8", "--limit", "5"], "error: --limit, --num-fewshot and --output-path "
                                             "apply to --tasks; give --tasks"),
        (["--device", "cpu"], "error: --device applies to --seq-len and --tasks"),
        (["--tasks", "x.yaml", "--limit", "0"], "error: --limit must be a number of docs >= 1 "
                                                "or a fraction in (0, 1), got 0.0"),
    ]  # fmt: skip
    for extra, line in cases:
        result = runner.invoke(app, ["eval", str(out), "--data", str(text), *extra])
        assert result.exit_code == 1 and result.stderr.strip() == line, (extra, result.output)
