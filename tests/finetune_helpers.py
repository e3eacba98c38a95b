"""Shared pieces of the fine-tuning tests: a tiny teacher, its compressed student, batches."""

from __future__ import annotations

import copy

import torch
from torch import nn

from compressor.core.compress import compress_
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets


def compressed(teacher: nn.Module, keep: float = 0.3, depth: int = 2) -> nn.Module:
    """A compressed copy of `teacher` (whose config learns its architecture name, as a saved
    checkpoint's would, so exports of the student reload)."""
    teacher.config.architectures = [type(teacher).__name__]
    student = copy.deepcopy(teacher)
    compress_(student, find_targets(student), RankPolicy(keep=keep), depth)
    return student


def token_batches(n: int, rows: int = 4, length: int = 16, vocab: int = 64, pad_last: bool = False):
    """`n` batches of random token ids (1..vocab-1) with attention masks; optionally the last
    row of each batch is padded after half its length."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.long)
        if pad_last:
            mask[-1, length // 2 :] = 0
            ids[-1, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
