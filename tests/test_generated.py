"""Calibration text a causal LM generates itself (training/generated.py), the perplexity on
held-out calibration text before and after compression, and its warning
(workflows/quality.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from compressor.errors import DlncError
from compressor.training.generated import GenerationSpec, can_generate, generate_calibration
from compressor.training.perplexity import batch_perplexity
from tests.tiny_models import build_tiny

SMALL = GenerationSpec(samples=6, length=12, seed=3, batch_size=4)


def test_generated_text_is_seeded_cached_and_leaves_the_rng_alone(tmp_path):
    model, files = build_tiny("llama"), [tmp_path / "w"]
    files[0].write_bytes(b"weights")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = generate_calibration(model, files, SMALL, tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)
    ids = load_file(first.path)["input_ids"]
    assert ids.shape == (6, 12) and ids.dtype == torch.long and not first.cached
    assert ids[:, 0].eq(model.config.bos_token_id).all()
    again = generate_calibration(model, files, SMALL, tmp_path / "a")
    assert again.cached and again.path == first.path and again.seconds == 0
    fresh = generate_calibration(model, files, SMALL, tmp_path / "b")  # no cache: same seed
    assert torch.equal(load_file(fresh.path)["input_ids"], ids)
    other = generate_calibration(model, files, GenerationSpec(6, 12, seed=4), tmp_path / "a")
    assert other.path != first.path
    assert not torch.equal(load_file(other.path)["input_ids"], ids)


def test_only_a_causal_lm_generates(tmp_path):
    bert = build_tiny("bert")
    assert not can_generate(bert) and can_generate(build_tiny("gpt2"))
    with pytest.raises(DlncError, match="causal language model"):
        generate_calibration(bert, [], SMALL, tmp_path)
    with pytest.raises(DlncError, match="generate_samples"):
        GenerationSpec(samples=0)


def test_batch_perplexity_is_exp_of_the_mean_loss_over_real_tokens():
    model = build_tiny("llama")
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding: its tokens are neither inputs nor predicted
    got = batch_perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    with torch.no_grad():
        full = model(input_ids=ids[:1], labels=ids[:1]).loss * 8  # 8 predictions, full row
        short = model(input_ids=ids[1:, :5], labels=ids[1:, :5]).loss * 4
    assert got == pytest.approx(math.exp(float(full + short) / 12), rel=1e-5)


def test_compress_without_data_calibrates_a_causal_lm_on_its_own_text(tiny_model, tmp_path):
    from cli_helpers import dlnc

    from compressor.io.load import load_pretrained

    model, folder = tiny_model("llama")
    result = dlnc("compress", folder, "--keep", 0.5, "--out", tmp_path / "gen", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    generated = report["generated_calibration"]
    # 32 x 256 tokens, cut to the model's position table (the tiny one's is shorter)
    positions = model.config.max_position_embeddings
    assert (generated["samples"], generated["length"]) == (32, min(256, positions))
    assert report["method"] == "whiten"
    ppl = report["perplexity"]
    assert ppl["text"] == "text the model generated" and ppl["held_out_samples"] == 4
    # measured on the generated file's last 4 samples (held out of the calibration)
    held = [{"input_ids": load_file(generated["path"])["input_ids"][-4:]}]
    assert ppl["before"] == pytest.approx(batch_perplexity(model, held), rel=1e-4)
    after = batch_perplexity(load_pretrained(tmp_path / "gen"), held)
    assert ppl["after"] == pytest.approx(after, rel=1e-4)
    card = (tmp_path / "gen" / "README.md").read_text()
    assert f"{ppl['before']:.2f} | {ppl['after']:.2f}" in card
    # --no-generate: the weights alone (plain SVD), nothing measured
    result = dlnc("compress", folder, "--keep", 0.5, "--out", tmp_path / "svd", "--json",
                  "--no-generate")  # fmt: skip
    report = json.loads(result.output)
    assert report["method"] == "svd"
    assert "perplexity" not in report and "generated_calibration" not in report


def test_a_model_much_worse_than_before_is_said_to_be(tiny_model):
    from compressor.training.data import Batches
    from compressor.workflows.plan import PlanInfo
    from compressor.workflows.quality import WORSE, record_perplexity

    model = build_tiny("llama")
    ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    held = [{"input_ids": ids}]
    real = batch_perplexity(model, held)
    info = PlanInfo(data=Batches(train=held, held_out=held, tokenizer=None, samples=8))
    for before, warned in ((real / (WORSE * 1.01), True), (real / (WORSE * 0.99), False)):
        info.perplexity_before = before
        summary, notices = {}, []
        record_perplexity(summary, notices, model, info)
        assert summary["perplexity"]["after"] == pytest.approx(real, rel=1e-3)
        assert bool(notices) == warned
    assert "raise `keep`" in notices[0] if notices else True


def test_a_cache_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def fail(tensors, filename, *args, **kwargs):
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(DlncError, match=r"No space left on device.*DLNC_CACHE"):
        generate_calibration(build_tiny("llama"), [], SMALL, tmp_path)
    assert not any(tmp_path.rglob("*.partial"))


def test_random_word_pieces_are_framed_plain_seeded_and_cached(tmp_path):
    from hf_helpers import framed_tokenizer

    from compressor.training.generated import random_calibration

    model, tok, files = build_tiny("bert"), framed_tokenizer(), [tmp_path / "w"]
    files[0].write_bytes(b"weights")
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first = random_calibration(model, tok, files, SMALL, tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.kind == "random word pieces" and not first.cached
    ids = load_file(first.path)["input_ids"]
    assert ids.shape == (6, 12) and ids.dtype == torch.long
    assert ids[:, 0].eq(tok.cls_token_id).all() and ids[:, -1].eq(tok.sep_token_id).all()
    body = ids[:, 1:-1]
    assert body.min() >= 4 and body.max() < model.config.vocab_size  # no special token inside
    assert len(body.unique()) > 20  # drawn across the vocabulary, not one token repeated
    again = random_calibration(model, tok, files, SMALL, tmp_path / "a")
    assert again.cached and again.path == first.path
    fresh = random_calibration(model, tok, files, SMALL, tmp_path / "b")  # no cache: same seed
    assert torch.equal(load_file(fresh.path)["input_ids"], ids)
    other = random_calibration(model, tok, files, GenerationSpec(6, 12, seed=4), tmp_path / "a")
    assert not torch.equal(load_file(other.path)["input_ids"], ids)


def test_only_a_text_encoder_samples_word_pieces(tmp_path):
    from hf_helpers import framed_tokenizer
    from transformers import BertModel, GPT2Model, LlamaModel

    from compressor.training.generated import can_sample_pieces, random_calibration

    bert = build_tiny("bert")
    assert can_sample_pieces(bert) and can_sample_pieces(BertModel(bert.config))
    for family in ("gpt2", "llama", "t5", "vit"):  # generates / has a decoder / reads pixels
        assert not can_sample_pieces(build_tiny(family)), family
    for body in (GPT2Model, LlamaModel):  # a decoder without its head is no encoder
        family = "gpt2" if body is GPT2Model else "llama"
        assert not can_sample_pieces(body(build_tiny(family).config)), family
    with pytest.raises(DlncError, match="text encoder"):
        random_calibration(build_tiny("gpt2"), framed_tokenizer(), [], SMALL, tmp_path)
    with pytest.raises(DlncError, match="no room for word pieces"):  # [CLS] [SEP] fill it
        random_calibration(build_tiny("bert"), framed_tokenizer(), [], GenerationSpec(2, 2))


def test_compress_without_data_calibrates_a_text_encoder_on_random_pieces(tiny_model, tmp_path):
    from cli_helpers import dlnc
    from hf_helpers import framed_tokenizer

    model, folder = tiny_model("bert")
    run = ("compress", folder, "--keep", 0.5, "--json", "--out")
    bare = json.loads(dlnc(*run, tmp_path / "bare").output)  # no tokenizer beside the weights
    assert bare["method"] == "svd" and "generated_calibration" not in bare
    assert any("no random word pieces" in n and "no tokenizer" in n for n in bare["notices"])
    framed_tokenizer().save_pretrained(tmp_path / "tok")  # a tokenizer named by --tokenizer
    named = json.loads(dlnc(*run, tmp_path / "named", "--tokenizer", tmp_path / "tok").output)
    assert named["generated_calibration"]["kind"] == "random word pieces"
    missing = dlnc(*run, tmp_path / "missing", "--tokenizer", tmp_path / "nowhere")
    assert missing.exit_code != 0 and "nowhere: no such tokenizer folder" in missing.output
    assert not (tmp_path / "missing").exists()
    framed_tokenizer().save_pretrained(folder)
    result = dlnc(*run, tmp_path / "pieces")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    generated = report["generated_calibration"]
    assert generated["kind"] == "random word pieces" and report["method"] == "whiten"
    # 64 x 128 tokens, cut to the model's position table (the tiny one's is shorter)
    positions = model.config.max_position_embeddings
    assert (generated["samples"], generated["length"]) == (64, min(128, positions))
    ids = load_file(generated["path"])["input_ids"]
    assert ids.shape == (64, min(128, positions)) and ids[:, 0].eq(2).all()
    assert any("random word pieces" in n for n in report["notices"])
    assert "correction" not in report  # one-shot factors: no refit on meaningless inputs
    plain = json.loads(dlnc(*run, tmp_path / "svd", "--no-generate").output)
    assert plain["method"] == "svd" and "generated_calibration" not in plain
