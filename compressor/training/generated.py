"""Calibration text a causal language model generates itself, for `compress` without `--data`.

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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.core.tasks import task_of
from compressor.errors import DlncError, first_line

__all__ = ["GENERATED", "Generated", "GenerationSpec", "can_generate", "generate_calibration"]


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


@dataclass(frozen=True)
class Generated:
    """A generated calibration file, and what it cost."""

    path: Path
    seconds: float  # generation time (0 when read from the cache)
    cached: bool
    spec: GenerationSpec

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "seconds": round(self.seconds, 1),
            "cached": self.cached,
            **asdict(self.spec),
        }


def can_generate(model: nn.Module) -> bool:
    """Whether `model` is a causal language model that can generate its own calibration."""
    return task_of(model) == "causal_lm" and callable(getattr(model, "generate", None))


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not can_generate(model):
        raise DlncError("only a causal language model can generate its calibration text")
    folder = (cache_dir or default_cache_dir()) / "generated"
    path = folder / f"{_key(model, weight_files, spec)}.safetensors"
    if path.is_file():
        return Generated(path, 0.0, True, spec)
    started = time.perf_counter()
    ids = _sample(model, spec)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": ids}, str(partial))
        os.replace(partial, path)  # atomic: a crash leaves no half file under the cached name
    except (OSError, SafetensorError) as e:
        partial.unlink(missing_ok=True)
        raise DlncError(
            f"{folder}: cannot keep the generated calibration text there ({first_line(e)}); "
            "set DLNC_CACHE to a writable folder, or give `data`"
        ) from e
    return Generated(path, time.perf_counter() - started, False, spec)


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


def _key(model: nn.Module, weight_files: list[Path], spec: GenerationSpec) -> str:
    """The cache key: the model's class, the weight files as they are on disk, the settings."""
    files = []
    for f in weight_files:
        stat = Path(f).stat()
        files.append([str(Path(f).resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps([type(model).__name__, files, asdict(spec)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
