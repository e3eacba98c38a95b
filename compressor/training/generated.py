"""Calibration inputs for `compress` without `--data`: text a causal language model generates
itself, or random word pieces for a text encoder.

A model compressed from its weights alone loses far more than one whose layers are fitted to
the inputs they really see (SmolLM2-135M at keep 0.8: perplexity x25,000 from truncated SVD,
against x1.5 with calibration prose; docs/benchmarks.md). A generative model can supply those
inputs itself: `generate_calibration` samples `samples` sequences of `length` tokens from the
model (seeded; each starts from its BOS token, or a token drawn at random when it has none, and
is sampled at temperature 1 with no top-k/top-p cut, so the text covers what the model knows
rather than its most likely phrases), and saves their ids as a `.safetensors` file of
`input_ids`, the format `--data` reads. The file is cached under `cache_dir` by the
checkpoint's weight files (path, size, modification time) and the settings, so a second run
reuses it.

Cost: one generation of `length` steps over a batch of `samples` (about a minute for
SmolLM2-135M's 32 x 256 on 2 CPU cores), paid once per checkpoint.

A text encoder (BERT and its kind: reads `input_ids`, no decoder, not causal) cannot generate,
but it gains nearly as much from inputs that merely look like its own: `random_calibration`
draws `samples` sequences of word pieces uniformly from its tokenizer's vocabulary (special
tokens left out) and frames each with what the tokenizer adds around a text ([CLS] ... [SEP]
for BERT). On all-MiniLM-L6-v2 at keep 0.5 that lifts the compressed model's cosine to the
original from 0.31 (weights alone) to 0.60, against 0.79 with real text; the frame matters
(a session-17 run without it: 0.45 against 0.52 with it, both with the refit).
`workflows/quality.generated_data` leaves the error-correcting refit off for them (it lost on
meaningless inputs; docs/benchmarks.md, sessions 17-18). Seeded; no model pass, so it costs
milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.core.tasks import task_of
from compressor.errors import DlncError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "GENERATED",
    "PIECES",
    "RANDOM_PIECES",
    "Generated",
    "GenerationSpec",
    "can_generate",
    "can_sample_pieces",
    "generate_calibration",
    "random_calibration",
]


@dataclass(frozen=True)
class GenerationSpec:
    """How much calibration text to generate, and from which seed."""

    samples: int = 32  # sequences
    length: int = 256  # tokens per sequence (the first one included)
    seed: int = 0
    batch_size: int = 16  # sequences generated at once

    def __post_init__(self) -> None:
        for name in ("samples", "length", "batch_size"):
            if getattr(self, name) < 1:
                raise DlncError(f"`generate_{name}` must be >= 1, got {getattr(self, name)}")


GENERATED = GenerationSpec()
"""The default: 32 x 256 tokens (8,192), as many as `--data`'s default calibration batches
hold at 128 tokens each for 64 samples."""

PIECES = "random word pieces"  # `Generated.kind` of a text encoder's calibration

RANDOM_PIECES = GenerationSpec(samples=64, length=128)
"""A text encoder's default: 64 x 128 tokens, the frame included, as `--data`'s default."""


@dataclass(frozen=True)
class Generated:
    """A generated calibration file, and what it cost."""

    path: Path
    seconds: float  # generation time (0 when read from the cache)
    cached: bool
    spec: GenerationSpec
    kind: str = "generated"  # or PIECES (a text encoder's)

    @property
    def inputs(self) -> str:
        """What the calibration inputs are, for a notice."""
        if self.kind == PIECES:
            return "random word pieces framed as the tokenizer frames a text"
        return "tokens the model generated"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "seconds": round(self.seconds, 1),
            "cached": self.cached,
            **asdict(self.spec),
        }


def can_generate(model: nn.Module) -> bool:
    """Whether `model` is a causal language model that can generate its own calibration."""
    return task_of(model) == "causal_lm" and callable(getattr(model, "generate", None))


def can_sample_pieces(model: nn.Module) -> bool:
    """Whether `model` is a text encoder that calibrates on random word pieces: it reads
    `input_ids`, has no decoder (T5 and BART do), and its family is one of transformers'
    masked-LM encoders (BERT, RoBERTa, DeBERTa, ...: a bare GPT-2 or Llama body is not)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and getattr(model, "main_input_name", None) == "input_ids"
        and not getattr(config, "is_encoder_decoder", False)
        and task_of(model) != "causal_lm"
    )


def default_cache_dir() -> Path:
    """`$DLNC_CACHE`, else `$XDG_CACHE_HOME/dlnc`, else `~/.cache/dlnc`."""
    if os.environ.get("DLNC_CACHE"):
        return Path(os.environ["DLNC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlnc"


@torch.no_grad()
def generate_calibration(
    model: nn.Module,
    weight_files: list[Path],
    spec: GenerationSpec = GENERATED,
    cache_dir: Path | None = None,
) -> Generated:
    """Sample `spec.samples` sequences from `model` (module docstring) into a cached
    `.safetensors` file of `input_ids`; the model's RNG state and mode are left as they were."""
    if not can_generate(model):
        raise DlncError("only a causal language model can generate its calibration text")
    path = _cached_path(cache_dir, _key(model, weight_files, spec))
    if path.is_file():
        return Generated(path, 0.0, True, spec)
    started = time.perf_counter()
    _save(_sample(model, spec), path)
    return Generated(path, time.perf_counter() - started, False, spec)


def random_calibration(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    weight_files: list[Path],
    spec: GenerationSpec = RANDOM_PIECES,
    cache_dir: Path | None = None,
) -> Generated:
    """`spec.samples` sequences of random word pieces of `tokenizer` framed as it frames a text
    (module docstring), in a cached `.safetensors` file of `input_ids`; the RNG is untouched."""
    if not can_sample_pieces(model):
        raise DlncError("only a text encoder calibrates on random word pieces")
    head, tail = _frame(tokenizer)
    vocab = min(len(tokenizer), int(getattr(model.config, "vocab_size", 0) or len(tokenizer)))
    body = spec.length - len(head) - len(tail)
    if body < 1:
        raise DlncError(f"no room for word pieces in {spec.length} tokens with the frame")
    path = _cached_path(cache_dir, _key(model, weight_files, spec, "pieces", head, tail, vocab))
    if path.is_file():
        return Generated(path, 0.0, True, spec, PIECES)
    started = time.perf_counter()
    special = set(tokenizer.all_special_ids) | set(head) | set(tail)
    pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if len(pool) == 0:
        raise DlncError("the tokenizer has no plain token inside the model's vocabulary")
    g = torch.Generator().manual_seed(spec.seed)
    picks = pool[torch.randint(len(pool), (spec.samples, body), generator=g)]
    ends = [torch.tensor([ids], dtype=torch.long).expand(spec.samples, -1) for ids in (head, tail)]
    _save(torch.cat([ends[0], picks, ends[1]], dim=1), path)
    return Generated(path, time.perf_counter() - started, False, spec, PIECES)


def _frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own ([CLS], [SEP] for BERT)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if plain and framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return framed, []  # no text tokens in sight: the frame goes first


def _cached_path(cache_dir: Path | None, key: str) -> Path:
    return (cache_dir or default_cache_dir()) / "generated" / f"{key}.safetensors"


def _save(ids: torch.Tensor, path: Path) -> None:
    """`ids` as `input_ids` at `path`, atomically: a crash leaves no half file under its name."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, str(partial))
        os.replace(partial, path)
    except (OSError, SafetensorError) as e:
        partial.unlink(missing_ok=True)
        raise DlncError(
            f"{path.parent}: cannot keep the generated calibration text there ({first_line(e)}); "
            "set DLNC_CACHE to a writable folder, or give `data`"
        ) from e


def _sample(model: nn.Module, spec: GenerationSpec) -> torch.Tensor:
    """samples x length token ids, generated in batches under the seed."""
    config = model.config
    vocab = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().out_features)
    bos = getattr(config, "bos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else getattr(config, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(spec.seed)
        for start in range(0, spec.samples, spec.batch_size):
            n = min(spec.batch_size, spec.samples - start)
            first = (
                torch.full((n, 1), bos, dtype=torch.long)
                if bos is not None
                else torch.randint(vocab, (n, 1))
            ).to(device)
            ids = model.generate(
                first,
                attention_mask=torch.ones_like(first),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=spec.length - 1,
                min_new_tokens=spec.length - 1,
                pad_token_id=pad,
            )
            out.append(ids[:, : spec.length].cpu())
    model.train(was_training)
    return torch.cat(out)


def _key(model: nn.Module, weight_files: list[Path], spec: GenerationSpec, *more) -> str:
    """The cache key: the model's class, the weight files as they are on disk, the settings
    (and `more` of them, JSON values)."""
    files = []
    for f in weight_files:
        stat = Path(f).stat()
        files.append([str(Path(f).resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([type(model).__name__, files, asdict(spec), *more], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
