"""Fuzzing every command that reads data against a model (issue 29): sample lengths around the
model's positions, the vocabulary sizes of data, model, tokenizer and teacher, and the dtypes a
tensor file may hold. Every run ends cleanly (exit 0) or with one `error:` line (exit 1), never
a traceback; where the outcome is known (ids outside the vocabulary, ids that are not integers,
samples longer than the model) the test says which.

The tiny models run on one torch thread: each case takes a fraction of a second."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from cli_helpers import dlnc, one_line_error
from conftest import build_tiny
from hf_helpers import WORDS, tiny_tokenizer
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIONS, VOCAB = 32, 64  # the tiny GPT-2's (tests/tiny_models.py)
LENGTHS = (1, 2, 31, 32, 33, 100)  # tokens per sample, around the 32 positions
DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
          torch.float32, torch.float16, torch.bfloat16)  # fmt: skip
TRUNCATED = f"longer than the model's {POSITIONS} positions: truncated"
OK = "ok"  # the run must succeed
ONE_TOKEN = "one token"  # samples of one token: compress has no next token to measure


@pytest.fixture(scope="module")
def one_thread():
    """`one_torch_thread` for the module's models, built once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    """Tiny GPT-2s of 64 ids (the tokenizer's), 80 (more than the tokenizer has) and 16
    (fewer), each with the 64-word tokenizer and an export at rank 4."""
    root = tmp_path_factory.mktemp("fuzz-commands")
    models, exports = {}, {}
    for vocab in (VOCAB, 80, 16):
        folder = root / f"gpt2-{vocab}"
        build_tiny("gpt2", vocab_size=vocab).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        out = root / f"gpt2-{vocab}-dlnc"
        done = dlnc("compress", folder, "--rank", 4, "--no-generate", "--out", out)
        assert done.exit_code == 0, done.output
        models[vocab], exports[vocab] = folder, out
    return SimpleNamespace(root=root, models=models, exports=exports)


def text(path, words: int):
    path.write_text("\n".join(" ".join(WORDS[(i + j) % 60] for j in range(words))
                              for i in range(8)) + "\n")  # fmt: skip
    return path


def ids(path, length: int = 12, dtype=torch.int64, top: int = VOCAB - 1, mask=None):
    """8 samples of `length` token ids up to `top` (the last id of the first sample), as
    `dtype`; with `mask`, an attention mask of that dtype."""
    g = torch.Generator().manual_seed(length)
    values = torch.randint(1, max(2, min(top, VOCAB)), (8, length), generator=g)
    values[0, -1] = top
    tensors = {"input_ids": values.to(dtype)}
    if mask is not None:
        tensors["attention_mask"] = torch.ones(8, length).to(mask)
    save_file(tensors, path)
    return path


# (name, how to write the data, the vocabulary of the model, what must happen: OK, an error
# naming this, or None: either, as long as it is clean)
CASES = [
    *[(f"text-{n}", lambda p, n=n: text(p / "d.txt", n), VOCAB, OK if n > 1 else ONE_TOKEN)
      for n in LENGTHS],
    *[(f"ids-{n}", lambda p, n=n: ids(p / "d.safetensors", n), VOCAB, OK if n > 1 else ONE_TOKEN)
      for n in LENGTHS],
    *[(f"dtype-{str(t)[6:]}", lambda p, t=t: ids(p / "d.safetensors", dtype=t), VOCAB,
       OK if not (t.is_floating_point or t == torch.bool) else "token ids are integers")
      for t in DTYPES],
    ("top-64", lambda p: ids(p / "d.safetensors", top=64), VOCAB, "token id 64 is outside"),
    ("top-80", lambda p: ids(p / "d.safetensors", top=80), VOCAB, "token id 80 is outside"),
    ("top-negative", lambda p: ids(p / "d.safetensors", top=-1), VOCAB, "token id -1 is outside"),
    *[(f"mask-{str(t)[6:]}", lambda p, t=t: ids(p / "d.safetensors", mask=t), VOCAB, None)
      for t in (torch.int64, torch.bool, torch.float32, torch.float16)],
    ("model-80-ids", lambda p: ids(p / "d.safetensors", top=79), 80, OK),
    ("model-80-text", lambda p: text(p / "d.txt", 12), 80, OK),
    ("model-16-text", lambda p: text(p / "d.txt", 12), 16, "outside the model's vocabulary of 16"),
    ("model-16-ids", lambda p: ids(p / "d.safetensors", top=15), 16, OK),
]  # fmt: skip


def command(name: str, world, vocab: int, data, out) -> list:
    model, export, teacher = world.models[vocab], world.exports[vocab], world.models[vocab]
    return {
        "compress": ["compress", model, "--data", data, "--out", out],
        "stream": ["compress", model, "--data", data, "--stream", "--method", "whiten",
                   "--out", out],
        "estimate-ranks": ["estimate-ranks", model, "--data", data],
        "finetune": ["finetune", export, "--data", data, "--teacher", teacher, "--steps", 2,
                     "--out", out],
        "eval": ["eval", export, "--data", data, "--teacher", teacher],
    }[name]  # fmt: skip


def clean(result, expected: str | None) -> None:
    """Exit 0, or one `error:` line; never an exception escaping the command."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    if expected == OK:
        assert result.exit_code == 0, result.output
    elif expected is not None:
        one_line_error(result, expected)
    elif result.exit_code:
        one_line_error(result)


@pytest.mark.parametrize("name", ["compress", "stream", "estimate-ranks", "finetune", "eval"])
@pytest.mark.parametrize(("case", "write", "vocab", "expected"), CASES, ids=[c[0] for c in CASES])
def test_every_command_on_every_kind_of_data(world, tmp_path, name, case, write, vocab, expected):
    data = write(tmp_path)
    if expected == ONE_TOKEN:  # the perplexity before and after (in memory only) needs two
        expected = "no token to predict in the held-out batches" if name == "compress" else OK
    result = dlnc(*command(name, world, vocab, data, tmp_path / "out"))
    clean(result, expected)
    length = int(case.rpartition("-")[2]) if case.startswith(("text-", "ids-")) else 0
    assert (TRUNCATED in result.output) == (length > POSITIONS)
    if result.exit_code:
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["finetune", "eval"])
@pytest.mark.parametrize("teacher", [VOCAB, 80, 16, "16-positions", "64-positions"])
def test_teachers_of_every_vocabulary_and_length(world, tmp_path, name, teacher):
    """Another vocabulary, or fewer positions than the model's (the samples are cut to the
    model's), is one line; more positions are fine."""
    data = ids(tmp_path / "d.safetensors", length=40, top=15)  # ids every model reads
    args = command(name, world, VOCAB, data, tmp_path / "out")
    if isinstance(teacher, str):
        positions = int(teacher.partition("-")[0])
        folder = tmp_path / teacher
        build_tiny("gpt2", n_positions=positions).save_pretrained(folder)
        args[args.index("--teacher") + 1] = folder
        expected = (
            OK if positions > POSITIONS else "the teacher covers 16 positions and the model 32"
        )
    else:
        args[args.index("--teacher") + 1] = world.models[teacher]
        expected = OK if teacher == VOCAB else f"a vocabulary of {teacher} tokens and the model 64"
    clean(dlnc(*args), expected)


@pytest.mark.parametrize("seq_len", [1, 2, 31, 32, 33, 100])
@pytest.mark.parametrize("words", [1, 31, 100])
def test_eval_seq_len_against_the_positions(world, tmp_path, seq_len, words):
    data = text(tmp_path / "d.txt", words)  # 8 lines: 8, 248 or 800 tokens in all
    result = dlnc("eval", world.exports[VOCAB], "--data", data, "--seq-len", seq_len)
    if seq_len > POSITIONS:
        clean(result, f"--seq-len {seq_len} is longer than the model's {POSITIONS} positions")
    elif seq_len < 2:
        clean(result, "--seq-len must be >= 2")
    else:
        clean(result, OK if 8 * words >= seq_len else "the text has only")


# other families: learned positions with token types (BERT), rotary positions (Llama), relative
# ones (T5, no limit), images (ViT) ---------------------------------------------------------


@pytest.fixture(scope="module")
def families(tmp_path_factory, one_thread):
    """Each family's tiny model (with the tokenizer, text families) and its export."""
    root = tmp_path_factory.mktemp("fuzz-families")
    made = {}
    for family in ("bert", "llama", "t5", "vit"):
        folder = root / family
        build_tiny(family).save_pretrained(folder)
        if family != "vit":
            tiny_tokenizer().save_pretrained(folder)
        out = root / f"{family}-dlnc"
        done = dlnc("compress", folder, "--rank", 4, "--no-generate", "--out", out)
        assert done.exit_code == 0, done.output
        made[family] = SimpleNamespace(models={VOCAB: folder}, exports={VOCAB: out})
    return made


def pixels(path, dtype):
    g = torch.Generator().manual_seed(0)
    save_file({"pixel_values": (torch.rand(8, 3, 16, 16, generator=g) * 255).to(dtype)}, path)
    return path


@pytest.mark.parametrize("name", ["compress", "stream", "estimate-ranks", "finetune", "eval"])
@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
@pytest.mark.parametrize("length", [31, 100])  # (short samples: the GPT-2 cases above)
def test_text_families_on_samples_around_their_positions(families, tmp_path, name, family, length):
    """BERT has 32 learned positions (and token types), the Llama 32 rotary ones, T5 no limit."""
    data = text(tmp_path / "d.txt", length)
    result = dlnc(*command(name, families[family], VOCAB, data, tmp_path / "out"))
    clean(result, None)
    limited = family != "t5" and length > POSITIONS
    assert (TRUNCATED in result.output) == (limited and result.exit_code == 0)


@pytest.mark.parametrize("name", ["compress", "stream", "estimate-ranks", "finetune", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8,
                                   torch.int64])  # fmt: skip
def test_vit_on_pixels_of_every_dtype(families, tmp_path, name, dtype):
    data = pixels(tmp_path / "d.safetensors", dtype)
    clean(dlnc(*command(name, families["vit"], VOCAB, data, tmp_path / "out")), None)
