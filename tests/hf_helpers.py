"""Helpers for the Hugging Face integration tests: a word-level tokenizer over a tiny vocabulary
(so pipelines, generation and lm-eval run offline), T5 beside the conftest families, and a
compressed export of any family."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import build_tiny, example_inputs
from torch import nn

WORDS = [f"w{i}" for i in range(60)]
"""The tiny models' vocabulary (64 ids): 4 special tokens, then w0 ... w59."""


def _word_level(specials: list[str], post: str | None = None, **tokens: str):
    """A fast tokenizer over `specials` then `WORDS`, split on whitespace; `post` a template
    framing each text (its special tokens from `specials`); `tokens` its named special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=tokens["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if post is not None:
        named = [(t, vocab[t]) for t in specials if t in post]
        core.post_processor = processors.TemplateProcessing(single=post, special_tokens=named)
    return PreTrainedTokenizerFast(tokenizer_object=core, **tokens)


def tiny_tokenizer():
    """A fast tokenizer over `WORDS`: ids 0-3 are <eos>, <unk>, <pad>, <mask>."""
    return _word_level(
        ["<eos>", "<unk>", "<pad>", "<mask>"], eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", bos_token="<eos>",
    )  # fmt: skip


def framed_tokenizer():
    """A BERT-like fast tokenizer over `WORDS`: ids 0-3 are [PAD], [UNK], [CLS], [SEP]; every
    text is framed as [CLS] ... [SEP]."""
    return _word_level(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]", unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
    )  # fmt: skip


def inputs(family: str) -> dict[str, torch.Tensor]:
    if family != "t5":
        return example_inputs(family)
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1, 64, (2, 12), generator=g),
        "decoder_input_ids": torch.randint(1, 64, (2, 6), generator=g),
    }


def compressed_export(
    family: str,
    tmp_path: Path,
    keep: float = 0.5,
    tokenizer: bool = False,
    model: nn.Module | None = None,
) -> tuple[nn.Module, Path]:
    """(the compressed model in memory, its export folder), compressed at `keep`; `model`
    stands in for `build_tiny(family)` (another class of the family)."""
    from compressor.core.compress import compress_
    from compressor.core.ranks import RankPolicy
    from compressor.core.targets import find_targets, weight_readers
    from compressor.io.checkpoint import load_checkpoint
    from compressor.io.export import export

    source = tmp_path / f"{family}-dense"
    (model if model is not None else build_tiny(family)).save_pretrained(source)
    if tokenizer:
        tiny_tokenizer().save_pretrained(source)
    loaded = load_checkpoint(source)
    targets = find_targets(loaded.model)
    for name in weight_readers(loaded.model, targets):  # T5's wo
        del targets[name]
    report = compress_(loaded.model, targets, RankPolicy(keep=keep))
    out = export(
        loaded.model, tmp_path / f"{family}-dlnc", config=loaded.config, source=source,
        report=report.to_dict(),
    )  # fmt: skip
    return loaded.model, out
