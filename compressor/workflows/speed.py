"""`speed` as a workflow: how fast a model runs, and a dense original beside it.

A causal LM is timed as users run it: prefill (one forward over `prefill_batch` prompts of
`prompt_len` tokens, building the KV cache) and decode (Hugging Face `generate` with the KV
cache, greedy, exactly `new_tokens` tokens per sequence, at each of `decode_batches`). Decode
tokens/s is read inside one `generate` call: a stopping criterion stamps the time after each
new token, so the rate covers tokens 2..N and leaves out the prefill and the first token. Any
other model (an encoder, a classifier) is timed as one forward pass over a batch of tokens.

Each number is the best of `repeats` runs after one warm-up run; with two models the runs
alternate (model, original, model, original, ...) in one process, so a busy machine slows
both alike. Inputs are random token ids (speed does not depend on the text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compressor.core.inputs import input_limits
from compressor.core.layers import FactorizedLinear
from compressor.core.tasks import task_spec
from compressor.errors import DlncError

__all__ = [
    "DTYPES",
    "ModelSpeed",
    "SpeedOptions",
    "check_device",
    "measure_models",
    "measure_speed",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a model can be timed in, by name."""


@dataclass(frozen=True)
class SpeedOptions:
    """What to time and how; every field checked before any model is loaded."""

    prefill_batch: int = 1  # prompts per prefill forward (and per encoder forward)
    prompt_len: int = 512  # tokens per prompt in prefill (and per encoder sample)
    decode_batches: tuple[int, ...] = (1, 8)  # sequences generated at once, one row each
    context_len: int = 32  # prompt tokens before decoding starts
    new_tokens: int = 32  # tokens generated per sequence (min = max: never stops early)
    repeats: int = 3  # best of this many timed runs, after one warm-up run
    device: str = "cpu"  # where the models run ("cpu", "cuda", "cuda:1", "mps")
    dtype: str = "float32"  # the dtype the models run in (a key of DTYPES)
    threads: int | None = None  # torch's intra-op CPU threads (None: torch's default)
    compile: bool = False  # run `torch.compile` of each model's forward
    seed: int = 0  # of the random token ids

    def __post_init__(self) -> None:
        for name in ("prefill_batch", "prompt_len", "context_len", "repeats"):
            if getattr(self, name) < 1:
                raise DlncError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 2:
            raise DlncError(f"`new_tokens` must be >= 2 (decode is timed after the first), "
                            f"got {self.new_tokens}")  # fmt: skip
        if not self.decode_batches or min(self.decode_batches) < 1:
            raise DlncError(f"`decode_batches` must be sizes >= 1, got {self.decode_batches}")
        if self.dtype not in DTYPES:
            raise DlncError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise DlncError(f"`threads` must be >= 1, got {self.threads}")
        check_device(self.device)


def check_device(device: str) -> torch.device:
    """`device` as a `torch.device` that exists here, else a one-line `DlncError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DlncError(f"`device` {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DlncError(f"`device` {device}: no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DlncError(f"`device` {device}: there are {torch.cuda.device_count()} GPUs")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DlncError(f"`device` {device}: no MPS device here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DlncError(f"`device` {device!r}: dlnc times models on cpu, cuda or mps")
    return dev


@dataclass
class ModelSpeed:
    """One model's timings (best of the repeats) and what it is."""

    path: str
    kind: str  # "causal_lm" (prefill + decode) or "forward" (one forward pass)
    params: int  # all its parameters
    factorized_layers: int  # its `FactorizedLinear` layers (0 for a dense model)
    prefill_ms: float | None = None  # causal LM: prefill_batch x prompt_len, KV cache built
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch -> tokens/s
    forward_ms: float | None = None  # any other model: one forward of the same shape

    def to_dict(self) -> dict:
        out = asdict(self)
        lm_only = ("prefill_ms", "decode_tokens_per_s")
        drop = ("forward_ms",) if self.kind == "causal_lm" else lm_only
        return {k: v for k, v in out.items() if k not in drop}


def measure_speed(
    path: str | os.PathLike,
    against: str | os.PathLike | None = None,
    options: SpeedOptions | None = None,
) -> dict[str, ModelSpeed]:
    """`{"model": ..., "dense": ...}` (the second with `against`): each model's timings under
    `options`, the two measured alternately in this process."""
    from compressor.workflows.finetune import check_teacher, load_model

    options = options or SpeedOptions()
    paths = {"model": path} | ({"dense": against} if against is not None else {})
    models = {label: load_model(p) for label, p in paths.items()}
    if "dense" in models:
        check_teacher(models["model"], models["dense"], against)
    return measure_models(models, options, {label: str(p) for label, p in paths.items()})


def measure_models(
    models: dict[str, nn.Module],
    options: SpeedOptions,
    names: dict[str, str] | None = None,
) -> dict[str, ModelSpeed]:
    """Each model's timings under `options`, by label, the models taking turns in every
    repeat (all causal LMs, or none); `names` (where each came from) default to the labels."""
    names = names or {label: label for label in models}
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    models = {label: _prepared(m, options) for label, m in models.items()}
    kinds = {label: _kind(m) for label, m in models.items()}
    for label, m in models.items():
        _check_lengths(m, names[label], kinds[label], options)
    if len(set(kinds.values())) > 1:
        raise DlncError(f"{', '.join(names.values())}: some are causal LMs and some are not")
    results = {label: _describe(names[label], m, kinds[label]) for label, m in models.items()}
    timers = {label: _timers(m, kinds[label], options) for label, m in models.items()}
    with _room_to_compile(options, len(models)):
        for key in next(iter(timers.values())):
            best = _alternate({label: t[key] for label, t in timers.items()}, options.repeats)
            for label, seconds in best.items():
                _record(results[label], key, seconds, options)
    return results


GRAPHS_PER_MODEL = 16
"""Compiled graphs dynamo may keep per model while `compile` times several (prefill and each
decode batch, a cache that grows): their forwards share one code object, so under dynamo's
default limit (8 graphs a code object) the second model of a run fell back to eager."""


def _room_to_compile(options: SpeedOptions, models: int) -> AbstractContextManager:
    """Meanwhile dynamo keeps `GRAPHS_PER_MODEL` graphs per model (when compiling)."""
    if not options.compile:
        return nullcontext()
    config = torch._dynamo.config
    return config.patch(recompile_limit=max(config.recompile_limit, GRAPHS_PER_MODEL * models))


def _prepared(model: nn.Module, options: SpeedOptions) -> nn.Module:
    model = model.to(device=options.device, dtype=DTYPES[options.dtype]).eval()
    if input_limits(model).main_input not in (None, "input_ids"):
        raise DlncError(f"{type(model).__name__}: speed times models that read token ids")
    if options.compile:
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def _check_lengths(model: nn.Module, path: object, kind: str, options: SpeedOptions) -> None:
    positions = input_limits(model).positions
    decoded = options.context_len + options.new_tokens if kind == "causal_lm" else 0
    longest = max(options.prompt_len, decoded)
    if positions is not None and longest > positions:
        name = "prompt_len" if options.prompt_len == longest else "context_len"
        raise DlncError(f"{path} covers {positions} positions; `{name}` asks for {longest}")


def _kind(model: nn.Module) -> str:
    return "causal_lm" if task_spec(model).task == "causal_lm" else "forward"


def _describe(path: str, model: nn.Module, kind: str) -> ModelSpeed:
    params = sum(p.numel() for p in model.parameters())
    factorized = sum(isinstance(m, FactorizedLinear) for m in model.modules())
    return ModelSpeed(path, kind, params, factorized)


Timer = Callable[[], float]


def _timers(model: nn.Module, kind: str, options: SpeedOptions) -> dict[str, Timer]:
    """What to time, by key ("prefill", "forward", "decode:<batch>"): each call runs once
    and gives the seconds it measured."""
    vocab = input_limits(model).vocab or 2
    gen = torch.Generator().manual_seed(options.seed)

    def ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(vocab, (batch, length), generator=gen).to(options.device)

    prompt = ids(options.prefill_batch, options.prompt_len)
    if kind != "causal_lm":
        return {"forward": lambda: _timed(lambda: model(input_ids=prompt), options.device)}
    timers = {"prefill": lambda: _timed(lambda: model(input_ids=prompt, use_cache=True),
                                        options.device)}  # fmt: skip
    for batch in options.decode_batches:
        context = ids(batch, options.context_len)
        timers[f"decode:{batch}"] = lambda c=context: _decode_seconds(model, c, options)
    return timers


@torch.inference_mode()
def _timed(run: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _decode_seconds(model: nn.Module, context: torch.Tensor, options: SpeedOptions) -> float:
    """Seconds `generate` spent on tokens 2..new_tokens (stamped after each token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw) -> torch.Tensor:
            _sync(options.device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    n = options.new_tokens
    model.generate(
        input_ids=context, attention_mask=torch.ones_like(context), max_new_tokens=n,
        min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([Stamp()]),
    )  # fmt: skip
    if len(stamps) != n:
        raise DlncError(f"generate made {len(stamps)} tokens, not {n}")
    return stamps[-1] - stamps[0]


def _alternate(timers: dict[str, Timer], repeats: int) -> dict[str, float]:
    """Best of `repeats` seconds per label after a warm-up, the labels taking turns."""
    for run in timers.values():
        run()  # warm-up (and compilation)
    best = dict.fromkeys(timers, float("inf"))
    for _ in range(repeats):
        for label, run in timers.items():
            best[label] = min(best[label], run())
    return best


def _record(result: ModelSpeed, key: str, seconds: float, options: SpeedOptions) -> None:
    seconds = max(seconds, 1e-9)
    if key == "prefill":
        result.prefill_ms = seconds * 1e3
    elif key == "forward":
        result.forward_ms = seconds * 1e3
    else:
        batch = int(key.split(":")[1])
        result.decode_tokens_per_s[batch] = batch * (options.new_tokens - 1) / seconds
