"""The one table of tiny model families the suites share: each built from a config with a
fixed seed (no hub), small enough for a unit test, saved the way a user's checkpoint is.

    build_tiny("llama")                      # the model, in eval mode
    build_tiny("t5", pad_token_id=None)      # the same family with config fields changed
    save_tiny("gpt2", tmp_path / "gpt2")     # a model folder (config.json + safetensors)
    example_inputs("t5")                     # inputs of the right kind for its forward

A new family is one entry in `TINY_MODELS` (and its inputs in `example_inputs` when they are
not token ids)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """A plain torch MLP (no transformers architecture): exercises tensor mode."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _transformers(config: str, model: str, **defaults: Any) -> Callable[..., nn.Module]:
    """A builder of `transformers.<model>(transformers.<config>(**defaults, **overrides))`."""

    def build(**overrides: Any) -> nn.Module:
        import transformers as tf

        return getattr(tf, model)(getattr(tf, config)(**{**defaults, **overrides}))

    return build


_GPT2 = dict(
    n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    vocab_size=64, max_position_embeddings=32, pad_token_id=0,
)  # fmt: skip
_LLAMA = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, vocab_size=64, max_position_embeddings=32,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)  # fmt: skip
_ROPE_LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,
)  # fmt: skip
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_QWEN2_MOE = _LLAMA | _MOE | dict(shared_expert_intermediate_size=32)
_QWEN3_MOE = _LLAMA | _MOE | dict(head_dim=8)
_MIXTRAL = _LLAMA | dict(num_local_experts=4, num_experts_per_tok=2)
_GEMMA3_TEXT = _LLAMA | dict(head_dim=8, sliding_window=8)
_GEMMA3 = dict(  # a vision-language model: Gemma 3 text beside a SigLIP tower
    text_config=_GEMMA3_TEXT | dict(vocab_size=68), mm_tokens_per_image=4,
    boi_token_index=65, eoi_token_index=66, image_token_index=67,  # above the test's token ids
    vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=4,
    ),
)  # fmt: skip
_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    image_size=16, patch_size=8, num_channels=3, num_labels=3,
)  # fmt: skip
_T5 = dict(
    d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64,
    decoder_start_token_id=0, pad_token_id=0,
)  # fmt: skip

TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "gpt2": _transformers("GPT2Config", "GPT2LMHeadModel", **_GPT2),
    "bert": _transformers("BertConfig", "BertForMaskedLM", **_BERT),
    # grouped-query attention: 4 query heads share 2 key/value heads (k/v are 16x32)
    "llama": _transformers("LlamaConfig", "LlamaForCausalLM", **_LLAMA),
    # a key/value head per query head (k/v are 32x32, square like q)
    "llama-mha": _transformers(
        "LlamaConfig", "LlamaForCausalLM", **_LLAMA | {"num_key_value_heads": 4}
    ),
    # the causal-LM families of today (transformers 5 names; all grouped-query, 2 of 4 heads)
    "llama3": _transformers("LlamaConfig", "LlamaForCausalLM", **_LLAMA, rope_scaling=_ROPE_LLAMA3),
    "mistral": _transformers("MistralConfig", "MistralForCausalLM", **_LLAMA),
    "qwen2": _transformers("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA),  # q/k/v with bias
    "qwen3": _transformers("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA, head_dim=8),  # q/k_norm
    "gemma": _transformers("GemmaConfig", "GemmaForCausalLM", **_LLAMA, head_dim=8),
    "gemma2": _transformers("Gemma2Config", "Gemma2ForCausalLM", **_GEMMA3_TEXT),
    "gemma3-text": _transformers("Gemma3TextConfig", "Gemma3ForCausalLM", **_GEMMA3_TEXT),
    "gemma3": _transformers("Gemma3Config", "Gemma3ForConditionalGeneration", **_GEMMA3),
    "phi3": _transformers("Phi3Config", "Phi3ForCausalLM", **_LLAMA),  # fused qkv, gate_up
    # experts fused into 3-D tensors (not dense layers); Qwen2-MoE adds a dense shared expert
    "qwen2-moe": _transformers("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_QWEN2_MOE),
    "qwen3-moe": _transformers("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_QWEN3_MOE),
    "mixtral": _transformers("MixtralConfig", "MixtralForCausalLM", **_MIXTRAL),
    # families no recipe claims, whose layer names match one (chosen by structure)
    "olmo2": _transformers("Olmo2Config", "Olmo2ForCausalLM", **_LLAMA),
    "gpt-bigcode": _transformers("GPTBigCodeConfig", "GPTBigCodeForCausalLM", **_GPT2),
    "vit": _transformers("ViTConfig", "ViTForImageClassification", **_VIT),
    "t5": _transformers("T5Config", "T5ForConditionalGeneration", **_T5),
    # no config of its own: saved as a bare model.safetensors, read in tensor mode
    "mlp": MLP,
}
"""Family name -> a builder taking config overrides (the MLP: its width)."""


def build_tiny(family: str, **overrides: Any) -> nn.Module:
    """A tiny, randomly initialised model of `family` (seed 0), in eval mode."""
    if family not in TINY_MODELS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(TINY_MODELS)}")
    torch.manual_seed(0)
    return TINY_MODELS[family](**overrides).eval()


def save_tiny(family: str, folder: Path, **overrides: Any) -> tuple[nn.Module, Path]:
    """(the model, the path to give dlnc): a model folder, or for the MLP a bare
    `folder/model.safetensors` with no config.json."""
    model = build_tiny(family, **overrides)
    if family != "mlp":
        model.save_pretrained(folder)
        return model, folder
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    return model, folder / "model.safetensors"


def example_inputs(family: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Forward inputs of the right kind for `family` (seeded): images for ViT, features for
    the MLP, token ids (and decoder ids for T5) otherwise."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if family == "mlp":
        return {"x": torch.randn(batch, 16, generator=g)}
    inputs = {"input_ids": torch.randint(1, 64, (batch, 12), generator=g)}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, 64, (batch, 6), generator=g)
    return inputs
