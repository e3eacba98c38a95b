"""ranks.yaml: written and read back exactly; every malformed file is one DlncError."""

from __future__ import annotations

import json

import pytest
from cli_helpers import dlnc, one_line_error

from compressor.errors import DlncError
from compressor.io.rankfile import load_ranks, save_ranks, split_ranks


def test_save_then_load_gives_the_same_ranks(tmp_path):
    ranks = {"a.q": 8, "a.k": None, "b.fc": 32}
    path = save_ranks(tmp_path / "r.yaml", ranks, method="whiten", keep=0.5, model="m")
    assert load_ranks(path) == ranks
    assert split_ranks(ranks) == ({"a.q": 8, "b.fc": 32}, ["a.k"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ranks: [1, 2]\n", "expected a mapping with a `ranks:` section"),
        ("ranks: {a: 0}\n", "rank of a must be an integer >= 1 or `dense`"),
        ("ranks: {a: 2.5}\n", "rank of a must be an integer"),
        ("ranks: {a: true}\n", "rank of a must be an integer"),
        ("ranks: {a: 2}\nextra: 1\n", "unknown key `extra`"),
        ("dlnc_ranks: 99\nranks: {a: 2}\n", "written by a newer dlnc"),
        ("ranks: {a: [\n", "not valid YAML"),
        # a layer listed twice was accepted, the last rank winning silently
        ("ranks:\n  a: 2\n  b: 3\n  a: 4\n", r"a is listed twice \(line 4\)"),
        ("ranks: {a: 2}\nranks: {a: 3}\n", "ranks is listed twice"),
    ],
)
def test_a_bad_ranks_file_is_one_error(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DlncError, match=message):
        load_ranks(path)


def test_a_missing_file_is_one_error(tmp_path):
    with pytest.raises(DlncError, match="no such ranks file"):
        load_ranks(tmp_path / "nope.yaml")


def test_unknown_informational_keys_are_refused_when_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown ranks-file keys"):
        save_ranks(tmp_path / "r.yaml", {"a": 1}, colour="red")


def test_a_ranks_file_that_is_not_utf8_is_one_line(gpt2, tmp_path):
    ranks = tmp_path / "ranks.yaml"
    ranks.write_bytes(b"ranks:\n  \xff\xfe: 3\n")
    result = dlnc("compress", gpt2, "--out", tmp_path / "out", "--ranks", ranks)
    one_line_error(result, "ranks.yaml", "UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_ranks_file_of_some_layers_says_the_others_follow_the_policy(gpt2, tmp_path):
    """The layers a ranks file leaves out are compressed under the recipe's keep: that used
    to happen without a word."""
    ranks = save_ranks(tmp_path / "r.yaml", {"transformer.h.0.attn.c_attn": 4})
    for stream in ([], ["--stream"]):
        out = tmp_path / f"out{len(stream)}"
        result = dlnc("compress", gpt2, "--ranks", ranks, "--no-generate", "--out", out, *stream)
        assert result.exit_code == 0, result.output
        said = f"ranks file {ranks} sets 1 of the 8 targeted layers; the other 7 are ranked by keep"
        assert said in " ".join(result.output.split())
    # a file that sets every targeted layer says nothing
    every = json.loads((out / "report.json").read_text())["layers"]
    full = save_ranks(tmp_path / "all.yaml", {r["name"]: 2 for r in every})
    result = dlnc("compress", gpt2, "--ranks", full, "--no-generate", "--out", tmp_path / "all")
    assert result.exit_code == 0 and "ranks file" not in result.output
