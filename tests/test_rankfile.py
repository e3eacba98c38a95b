"""ranks.yaml: written and read back exactly; every malformed file is one DlncError."""

from __future__ import annotations

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
