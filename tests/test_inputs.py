"""Data and teachers checked against the model before any work (issue 29): samples longer than
the model's positions are truncated and said once; token ids outside its vocabulary, ids that
are not integers, a tensor file without the model's input and a teacher with another
vocabulary are one line each. Each of these crashed with a traceback before."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import dlnc, one_line_error
from conftest import build_tiny
from hf_helpers import WORDS, tiny_tokenizer
from safetensors.torch import load_file, save_file

from compressor.core.inputs import InputLimits, input_limits
from compressor.errors import DlncError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only cost

POSITIONS, VOCAB = 32, 64  # the tiny GPT-2's (tests/tiny_models.py)
TRUNCATED = f"samples are longer than the model's {POSITIONS} positions: truncated to {POSITIONS}"


def words(n: int, shift: int = 0) -> str:
    return " ".join(WORDS[(shift + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer, its export, the same GPT-2 with a larger vocabulary,
    and text whose samples are 100 words long (the model has 32 positions)."""
    root = tmp_path_factory.mktemp("inputs")
    gpt2 = root / "gpt2"
    build_tiny("gpt2").save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    export = root / "gpt2-dlnc"
    done = dlnc("compress", gpt2, "--rank", 4, "--no-generate", "--out", export)
    assert done.exit_code == 0, done.output
    wide = root / "gpt2-v80"
    build_tiny("gpt2", vocab_size=80).save_pretrained(wide)
    tiny_tokenizer().save_pretrained(wide)
    long = root / "long.txt"
    long.write_text("\n".join(words(100, i) for i in range(12)) + "\n")
    short = root / "short.txt"
    short.write_text("\n".join(words(10, i) for i in range(12)) + "\n")
    return SimpleNamespace(gpt2=gpt2, export=export, wide=wide, long=long, short=short, root=root)


def ids_file(path, ids: torch.Tensor, **more: torch.Tensor):
    save_file({"input_ids": ids, **more}, path)
    return path


# what a model accepts -----------------------------------------------------------------------


def test_input_limits_are_read_from_the_model():
    import transformers as tf

    assert input_limits(build_tiny("gpt2")) == InputLimits(POSITIONS, VOCAB, "input_ids")
    assert input_limits(build_tiny("bert")) == InputLimits(32, 64, "input_ids")
    assert input_limits(build_tiny("llama")) == InputLimits(32, 64, "input_ids")
    assert input_limits(build_tiny("t5")) == InputLimits(None, 64, "input_ids")  # relative
    assert input_limits(build_tiny("vit")) == InputLimits(None, None, "pixel_values")
    # RoBERTa counts positions from padding_idx + 1: 34 rows cover 32 tokens
    config = tf.RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=64, vocab_size=64, max_position_embeddings=34,
                              pad_token_id=1)  # fmt: skip
    assert input_limits(tf.RobertaForMaskedLM(config)).positions == 32
    with torch.device("meta"):  # a streamed model's skeleton: shapes only
        assert input_limits(build_tiny("gpt2")) == InputLimits(POSITIONS, VOCAB, "input_ids")


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.tensor([[1, 64]]), "token id 64 is outside the model's vocabulary of 64 ids"),
        (torch.tensor([[-1, 3]]), "token id -1 is outside"),
        (torch.tensor([[1.0, 2.0]]), "`input_ids` holds float32 values; token ids are integers"),
        (torch.tensor([[True]]), "`input_ids` holds bool values"),
    ],
)
def test_token_ids_outside_the_vocabulary_or_not_integers_are_one_line(ids, message):
    with pytest.raises(DlncError, match=message):
        InputLimits(POSITIONS, VOCAB).check_ids(ids, "d.safetensors")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrower_integer_ids_are_widened(dtype):
    """int32 ids crashed the losses (cross-entropy takes int64 targets), narrower ones the
    embedding lookup."""
    ids = torch.tensor([[1, 63]], dtype=dtype)
    widened = InputLimits(POSITIONS, VOCAB).check_ids(ids, "d")
    assert widened.dtype == torch.int64 and widened.tolist() == [[1, 63]]
    kept = torch.tensor([[1, 63]])
    assert InputLimits(POSITIONS, VOCAB).check_ids(kept, "d") is kept


# samples longer than the model: every command truncates and says so once ------------------


def test_load_data_truncates_to_the_model_and_says_so_once(lm):
    from compressor.training.data import DataOptions, load_data

    model = build_tiny("gpt2")
    data = load_data(DataOptions(lm.long), lm.gpt2, eval_fraction=0.25, model=model)
    widths = {b["input_ids"].shape[1] for b in [*data.train, *data.held_out]}
    assert widths == {POSITIONS}
    assert data.notices == [f"{lm.long}: 12 of 12 {TRUNCATED} tokens"]
    # without the model (or with short samples) nothing changes
    alone = load_data(DataOptions(lm.long), lm.gpt2)
    assert alone.train[0]["input_ids"].shape[1] == 100 and alone.notices == []
    short = load_data(DataOptions(lm.short), lm.gpt2, model=model)
    plain = load_data(DataOptions(lm.short), lm.gpt2)
    assert short.notices == [] and all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(short.train, plain.train, strict=True)
    )


def test_tensor_samples_are_cut_with_their_mask_and_labels(lm, tmp_path):
    from compressor.training.data import DataOptions, load_data

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (6, 50), generator=g)
    path = ids_file(tmp_path / "d.safetensors", ids, attention_mask=torch.ones(6, 50),
                    labels=ids.clone())  # fmt: skip
    data = load_data(DataOptions(path, batch_size=4), lm.gpt2, model=build_tiny("gpt2"))
    batch = data.train[0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (4, 32), "attention_mask": (4, 32), "labels": (4, 32),
    }  # fmt: skip
    assert torch.equal(batch["input_ids"], ids[:4, :POSITIONS])
    assert data.notices == [f"{path}: 6 of 6 {TRUNCATED} tokens"]


def test_compress_with_long_samples_in_memory_and_streamed(lm, tmp_path):
    """Both paths truncate, say so once, and still write the same export bit for bit."""
    common = ["--data", lm.long, "--keep", 0.5, "--method", "whiten"]
    for out, args in (("a", []), ("b", ["--stream"])):
        result = dlnc("compress", lm.gpt2, *common, *args, "--out", tmp_path / out)
        assert result.exit_code == 0, result.output
        assert result.output.count(TRUNCATED) == 1
        report = json.loads((tmp_path / out / "report.json").read_text())
        assert sum(TRUNCATED in n for n in report["notices"]) == 1
    # the tensors bit for bit (the header's metadata order is the safetensors writer's own)
    a, b = (load_file(tmp_path / out / "model.safetensors") for out in ("a", "b"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_estimate_ranks_with_long_samples(lm):
    result = dlnc("estimate-ranks", lm.gpt2, "--data", lm.long)
    assert result.exit_code == 0, result.output
    assert result.output.count(TRUNCATED) == 1


def test_finetune_with_long_samples(lm, tmp_path):
    result = dlnc("finetune", lm.export, "--data", lm.long, "--teacher", lm.gpt2, "--steps", 2,
                  "--out", tmp_path / "ft")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count(TRUNCATED) == 1


def test_eval_with_long_samples(lm):
    result = dlnc("eval", lm.export, "--data", lm.long, "--teacher", lm.gpt2)
    assert result.exit_code == 0, result.output
    assert result.output.count(TRUNCATED) == 1
    result = dlnc("eval", lm.export, "--data", lm.long, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"model"} and TRUNCATED in result.stderr


def test_eval_seq_len_beyond_the_positions_is_one_line(lm):
    one_line_error(dlnc("eval", lm.export, "--data", lm.long, "--seq-len", 64),
                   "--seq-len 64 is longer than the model's 32 positions")  # fmt: skip
    assert dlnc("eval", lm.export, "--data", lm.long, "--seq-len", POSITIONS).exit_code == 0


# malformed tensor data: one line naming the problem, for every command ---------------------

BAD_TENSORS = {
    "outside": (lambda: {"input_ids": torch.full((8, 12), 70)}, "token id 70 is outside"),
    "float": (lambda: {"input_ids": torch.rand(8, 12)}, "holds float32 values"),
    "no-ids": (lambda: {"tokens": torch.ones(8, 12, dtype=torch.long)}, "no `input_ids` tensor"),
}


def command(name: str, lm, data, tmp_path) -> list:
    """`dlnc <name>` on `data` (the commands that read calibration or training data)."""
    return {
        "compress": ["compress", lm.gpt2, "--data", data, "--out", tmp_path / "o"],
        "stream": ["compress", lm.gpt2, "--data", data, "--stream", "--method", "whiten",
                   "--out", tmp_path / "o"],
        "estimate-ranks": ["estimate-ranks", lm.gpt2, "--data", data],
        "finetune": ["finetune", lm.export, "--data", data, "--teacher", lm.gpt2, "--steps", 1,
                     "--out", tmp_path / "o"],
        "eval": ["eval", lm.export, "--data", data],
    }[name]  # fmt: skip


COMMANDS = ("compress", "stream", "estimate-ranks", "finetune", "eval")


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize("bad", sorted(BAD_TENSORS))
def test_malformed_tensor_data_is_one_line(lm, tmp_path, name, bad):
    make, needle = BAD_TENSORS[bad]
    save_file(make(), tmp_path / "bad.safetensors")
    result = dlnc(*command(name, lm, tmp_path / "bad.safetensors", tmp_path))
    one_line_error(result, "bad.safetensors", needle)
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_beyond_the_vocabulary_is_one_line(lm, tmp_path):
    """The model has 16 token ids, its tokenizer 64: text ids beyond 15 are refused."""
    folder = tmp_path / "narrow"
    build_tiny("gpt2", vocab_size=16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = dlnc("estimate-ranks", folder, "--data", lm.short)
    one_line_error(result, "short.txt, tokenized", "outside the model's vocabulary of 16 ids",
                   "give the model's own --tokenizer")  # fmt: skip


# teachers ----------------------------------------------------------------------------------


def with_teacher(name: str, lm, teacher, tmp_path) -> list:
    if name == "finetune":
        return ["finetune", lm.export, "--data", lm.short, "--teacher", teacher, "--steps", 1,
                "--out", tmp_path / "o"]  # fmt: skip
    return ["eval", lm.export, "--data", lm.short, "--teacher", teacher]


@pytest.mark.parametrize("name", ["finetune", "eval"])
def test_a_teacher_with_another_vocabulary_is_one_line_before_any_work(
    lm, tmp_path, monkeypatch, name
):
    def no_work(*args, **kwargs):
        raise AssertionError("data was read before the teacher was checked")

    monkeypatch.setattr("compressor.workflows.finetune.load_data", no_work)
    monkeypatch.setattr("compressor.workflows.evaluate.load_data", no_work)
    result = dlnc(*with_teacher(name, lm, lm.wide, tmp_path))
    one_line_error(result, str(lm.wide), "a vocabulary of 80 tokens and the model 64")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["finetune", "eval"])
def test_a_truncated_teacher_names_its_folder(lm, tmp_path, name):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for f in lm.gpt2.iterdir():
        (teacher / f.name).write_bytes(f.read_bytes())
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20000])
    one_line_error(dlnc(*with_teacher(name, lm, teacher, tmp_path)),
                   f"{weights}: not a valid safetensors file")  # fmt: skip
