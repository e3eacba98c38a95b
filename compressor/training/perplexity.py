"""Perplexity with the protocol of the compression papers (GPTQ, SVD-LLM, ASVD): the whole text
tokenized once, cut into non-overlapping windows of `seq_len` tokens, the remainder dropped;
each window is scored on its `seq_len - 1` next-token predictions and perplexity is
exp(total negative log-likelihood / tokens predicted). No window sees the one before it, so the
number is comparable across papers only at the same `seq_len` (2048 for most LLM results).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from compressor.core.inputs import input_limits
from compressor.core.tasks import IGNORE_INDEX, TaskSpec, model_inputs
from compressor.errors import DlncError

__all__ = ["PROTOCOL", "Perplexity", "batch_perplexity", "check_window", "window_perplexity"]

PROTOCOL = (
    "non-overlapping windows of {seq_len} tokens; the last {dropped} tokens (less than a window) "
    "dropped; each window scores its {scored} next-token predictions"
)


@dataclass
class Perplexity:
    """The result of `window_perplexity`."""

    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token, in nats
    seq_len: int  # tokens per window
    windows: int  # windows scored
    tokens_predicted: int  # windows * (seq_len - 1)
    tokens_dropped: int  # the remainder after the last whole window

    @property
    def protocol(self) -> str:
        """The protocol in words, for the output."""
        return PROTOCOL.format(
            seq_len=self.seq_len, dropped=self.tokens_dropped, scored=self.seq_len - 1
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


@torch.no_grad()
def window_perplexity(
    model: nn.Module, token_ids: torch.Tensor, seq_len: int, batch_size: int = 1
) -> Perplexity:
    """Perplexity of a causal LM on a 1-D tensor of token ids (see the module docstring)."""
    check_window(model, seq_len)
    if batch_size < 1:
        raise DlncError(f"`batch_size` must be >= 1, got {batch_size}")
    hint = "; give the model's own `tokenizer`"
    token_ids = input_limits(model).check_ids(token_ids, "the text, tokenized", hint)
    windows = token_ids.numel() // seq_len
    if windows == 0:
        raise DlncError(f"`seq_len` {seq_len}: the text has only {token_ids.numel()} tokens")
    device = next(model.parameters()).device
    chunks = token_ids[: windows * seq_len].view(windows, seq_len)
    causal = TaskSpec("causal_lm")  # every window a full one: no padding to skip
    total = 0.0
    model.eval()
    for batch in chunks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += causal.loss(logits, {"input_ids": batch}, reduction="sum")
    predicted = windows * (seq_len - 1)
    nll = float(total) / predicted
    return Perplexity(
        perplexity=math.exp(nll), nll=nll, seq_len=seq_len, windows=windows,
        tokens_predicted=predicted, tokens_dropped=token_ids.numel() - windows * seq_len,
    )  # fmt: skip


def check_window(model: nn.Module, seq_len: int) -> None:
    """A `DlncError` unless windows of `seq_len` tokens fit the model: at least 2 tokens,
    at most its positions (a longer window would not be the protocol asked for)."""
    if seq_len < 2:
        raise DlncError(f"`seq_len` must be >= 2, got {seq_len}")
    positions = input_limits(model).positions
    if positions is not None and seq_len > positions:
        raise DlncError(
            f"`seq_len` {seq_len} is longer than the model's {positions} positions; "
            f"give at most {positions}"
        )


@torch.no_grad()
def batch_perplexity(model: nn.Module, batches: list) -> float:
    """A causal LM's perplexity on model batches (`input_ids`, optional `attention_mask`):
    exp of the mean negative log-likelihood over every next token that is not padding."""
    causal = TaskSpec("causal_lm")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**model_inputs(batch, model), use_cache=False).logits
            _, labels = causal.targets(logits, batch)
            total += float(causal.loss(logits, batch, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if not count:
        raise DlncError("no token to predict in the held-out batches")
    return math.exp(total / count)
