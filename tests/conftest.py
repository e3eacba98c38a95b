"""Shared fixtures: tiny models of each supported family, built from configs and saved to
tmp_path (no hub). `tiny_model(family)` returns (model, folder)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("gpt2", "bert", "llama", "vit")


def build_tiny(family: str) -> nn.Module:
    """A tiny, randomly initialised transformers model of `family`, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = tf.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=64, max_position_embeddings=32, pad_token_id=0,
        )  # fmt: skip
        model = tf.BertForMaskedLM(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=64, max_position_embeddings=32,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    elif family == "vit":
        cfg = tf.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=16, patch_size=8, num_channels=3, num_labels=3,
        )  # fmt: skip
        model = tf.ViTForImageClassification(cfg)
    elif family == "t5":
        cfg = tf.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64,
            decoder_start_token_id=0, pad_token_id=0,
        )  # fmt: skip
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown family {family}")
    return model.eval()


def example_inputs(family: str, batch: int = 2) -> dict[str, torch.Tensor]:
    """Model inputs of the right kind for `family` (fixed seed)."""
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(1, 64, (batch, 12), generator=g)}


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: thread start-up costs more than it saves, worst on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[[str], tuple[nn.Module, Path]]:
    def make(family: str) -> tuple[nn.Module, Path]:
        model = build_tiny(family)
        folder = tmp_path / family
        model.save_pretrained(folder)
        return model, folder

    return make


class MLP(nn.Module):
    """A plain torch MLP (no transformers architecture): exercises tensor mode."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def tiny_mlp(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A plain MLP saved as a bare model.safetensors with no config.json."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = MLP().eval()
    path = tmp_path / "mlp" / "model.safetensors"
    path.parent.mkdir()
    save_file(model.state_dict(), path)
    return model, path


def tree_snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size and mtime: to prove nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
