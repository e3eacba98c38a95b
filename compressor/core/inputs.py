"""What a model's forward pass accepts, read from the model itself: how many tokens its
position embeddings cover, how many token ids its input embedding has, and the input it
cannot do without. Data is checked against these before any work (`training.data`), so a
sample longer than the model, an id outside its vocabulary or a file without the model's
input is one line, not a traceback from inside the forward pass.

    limits = input_limits(model)          # InputLimits(positions=1024, vocab=50257, ...)
    ids = limits.check_ids(batch["input_ids"], "data.safetensors")  # or a one-line error
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import DlncError

__all__ = ["POSITION_KEYS", "InputLimits", "input_limits"]

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")
"""The config fields that give the longest sequence a model's positions cover."""


@dataclass(frozen=True)
class InputLimits:
    """The inputs a model accepts (None: no limit known)."""

    positions: int | None = None  # tokens per sample its positions cover
    vocab: int | None = None  # token ids must be in [0, vocab): its input embedding's rows
    main_input: str | None = None  # the input it cannot run without (`input_ids`, `pixel_values`)

    def check_ids(self, ids: torch.Tensor, where: str, hint: str = "") -> torch.Tensor:
        """`ids` as token ids the model's embedding and losses take (int64: a narrower
        integer type is widened; int32 ids fail in cross-entropy); a `DlncError` naming
        `where` (and ending with `hint`) for ids that are not integers or fall outside the
        vocabulary."""
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise DlncError(
                f"{where}: `input_ids` holds {_dtype(ids)} values; token ids are integers"
            )
        if ids.dtype != torch.int64:
            ids = ids.long()
        if ids.numel() and self.vocab is not None:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab:
                bad = low if low < 0 else high
                raise DlncError(
                    f"{where}: token id {bad} is outside the model's vocabulary of {self.vocab} "
                    f"ids (0 to {self.vocab - 1}){hint}"
                )
        return ids

    def check_tensors(
        self, tensors: dict[str, torch.Tensor], where: str
    ) -> dict[str, torch.Tensor]:
        """Input tensors (a `.safetensors` data file's, named `where`) with the model's main
        input present and their `input_ids` checked (`check_ids`) when the model embeds token
        ids; a `DlncError` if not."""
        main = self.main_input
        embeds = main == "input_ids" and "inputs_embeds" in tensors
        if main is not None and main not in tensors and not embeds:
            raise DlncError(
                f"{where}: no `{main}` tensor, the input this model reads "
                f"(the file holds {', '.join(sorted(tensors))})"
            )
        if "input_ids" not in tensors or self.vocab is None:
            return dict(tensors)
        return {**tensors, "input_ids": self.check_ids(tensors["input_ids"], where)}


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def input_limits(model: nn.Module) -> InputLimits:
    """The `InputLimits` of `model` (a DDP wrapper is looked through; a model on the meta
    device works: only shapes are read)."""
    model = getattr(model, "module", model)
    embedding = _input_embedding(model)
    vocab = embedding.num_embeddings if embedding is not None else None
    if vocab is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    positions = [
        p for p in (_declared(getattr(model, "config", None)), _table(model, embedding))
        if p is not None
    ]  # fmt: skip
    main = getattr(model, "main_input_name", None)
    return InputLimits(
        positions=min(positions) if positions else None,
        vocab=vocab if isinstance(vocab, int) and vocab > 0 else None,
        main_input=main if isinstance(main, str) else None,
    )


def _declared(config) -> int | None:
    """The longest sequence the model's config says its positions cover (None: unbounded)."""
    for name in POSITION_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return embedding if isinstance(embedding, nn.Embedding) else None


def _table(model: nn.Module, embedding: nn.Embedding | None) -> int | None:
    """The rows of a learned position table beside the token embedding, less the ids a
    padding offset takes (RoBERTa counts positions from `padding_idx + 1`)."""
    if embedding is None:
        return None
    for name, module in model.named_modules():
        if module is embedding:
            parent = model.get_submodule(name.rpartition(".")[0])
            break
    else:
        return None
    rows = [
        m.num_embeddings - (m.padding_idx + 1 if m.padding_idx is not None else 0)
        for n, m in parent.named_children()
        if isinstance(m, nn.Embedding) and m is not embedding and ("position" in n or n == "wpe")
    ]
    return min(rows) if rows else None
