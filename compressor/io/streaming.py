"""Checkpoints larger than memory: read one tensor at a time, write shards tensor by tensor.

`TensorSource` indexes a (sharded) safetensors checkpoint by its headers only and reads one
tensor on demand (each read opens and closes its file, so no mapping of the whole checkpoint
stays resident). `write_safetensors` writes a shard whose header is known in advance and
whose tensors are produced one by one, so a shard never has to be held in memory whole.
`meta_model` builds a transformers model's module tree without allocating its weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from compressor.errors import DlncError, first_line

__all__ = [
    "TensorSource",
    "TensorSpec",
    "file_order",
    "meta_model",
    "module_loader",
    "return_freed_memory",
    "write_safetensors",
]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
PIECE_BYTES = 32 * 2**20
"""Tensors copied unchanged into an export are read and written in pieces of this size."""
_ALIGNMENT = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
"""safetensors' dtype order: a file lists its tensors by this order (descending), then name."""


def file_order(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """The names in the order safetensors itself writes them, so a file written here is
    byte for byte the one `safetensors.torch.save_file` writes."""
    return sorted(specs, key=lambda n: (-_ALIGNMENT.index(_NAMES[specs[n][1]]), n))


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lives and what it is, from a safetensors header."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # where its bytes start in the file

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class TensorSource:
    """The tensors of safetensors files by name; nothing is read until `get`."""

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self.specs: dict[str, TensorSpec] = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as handle:  # the library validates the file
                    for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        part = handle.get_slice(key)
                        dtype = _DTYPES.get(part.get_dtype())
                        if dtype is None:
                            raise DlncError(f"{f}: {key} has dtype {part.get_dtype()}")
                        self.specs[key] = TensorSpec(f, tuple(part.get_shape()), dtype)
                for key, offset in _data_offsets(f).items():
                    self.specs[key] = replace(self.specs[key], offset=offset)
            except (SafetensorError, OSError, ValueError) as e:
                raise DlncError(f"{f}: not a valid safetensors file ({first_line(e)})") from e

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from disk into its own memory (a plain read: no mapping of the
        file, so the process holds the tensor's bytes once)."""
        spec = self.specs[key]
        return _read(spec, 0, spec.shape[0] if spec.shape else 1)

    def pieces(self, key: str, max_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """One tensor as consecutive blocks of rows of at most about `max_bytes` (default
        `PIECE_BYTES`) each, read one block at a time (whole when smaller, or without rows)."""
        spec = self.specs[key]
        max_bytes = max_bytes or PIECE_BYTES
        if spec.nbytes <= max_bytes or len(spec.shape) == 0:
            yield self.get(key)
            return
        rows = max(1, spec.shape[0] * max_bytes // spec.nbytes)
        for start in range(0, spec.shape[0], rows):
            yield _read(spec, start, min(rows, spec.shape[0] - start))

    def columns(self, key: str, columns: int) -> Iterator[torch.Tensor]:
        """A 2-D tensor's columns, `columns` at a time, each block read row by row (strided
        reads: a column block is not contiguous on disk) and returned transposed (columns x
        rows, contiguous), so a column block costs its own bytes and no more."""
        spec = self.specs[key]
        rows, width = spec.shape
        size = spec.dtype.itemsize
        with open(spec.file, "rb", buffering=0) as f:
            for start in range(0, width, columns):
                count = min(columns, width - start)
                out = torch.empty(rows, count, dtype=spec.dtype)
                buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
                step = count * size
                for row in range(rows):
                    at = spec.offset + (row * width + start) * size
                    if _read_at(f, buffer[row * step : (row + 1) * step], at) != step:
                        raise DlncError(f"{spec.file}: the file ends inside a tensor")
                yield out.T.contiguous()

    def meta_state(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype (tensor mode's module tree)."""
        return {
            k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in self.specs.items()
        }


def _read_at(f, buffer: memoryview, at: int) -> int:
    """Read into `buffer` from byte `at` of an unbuffered file: one system call where the
    platform has `preadv` (a column block is thousands of short reads)."""
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [buffer], at)
    f.seek(at)
    return f.readinto(buffer)


def _data_offsets(path: Path) -> dict[str, int]:
    """Each tensor's first byte in a safetensors file: after the 8-byte header length and the
    JSON header, at the tensor's `data_offsets[0]` (the format's documented layout)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {k: 8 + size + v["data_offsets"][0] for k, v in header.items()}


def _read(spec: TensorSpec, start: int, rows: int) -> torch.Tensor:
    """`rows` rows of a tensor from row `start` (a 0-d tensor: start 0, rows 1)."""
    shape = (rows, *spec.shape[1:]) if spec.shape else ()
    out = torch.empty(shape, dtype=spec.dtype)
    row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
    if out.numel() == 0:
        return out
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(spec.file, "rb") as f:
        f.seek(spec.offset + start * row_bytes)
        if f.readinto(buffer) != len(buffer):
            raise DlncError(f"{spec.file}: the file ends inside a tensor (truncated?)")
    return out


def module_loader(source: TensorSource, keys: Mapping[str, str | None]):
    """load(prefix, module): assign `module`'s parameters and stored buffers (recursively)
    from the checkpoint; `keys` maps model state-dict keys to checkpoint keys."""

    def load(prefix: str, module: nn.Module) -> None:
        state = {}
        for name in module.state_dict(keep_vars=True):
            src = keys.get(f"{prefix}.{name}" if prefix else name)
            if src is not None:
                state[name] = source.get(src)
        module.load_state_dict(state, strict=False, assign=True)

    return load


def return_freed_memory() -> None:
    """From now on, have glibc's malloc give every freed block of 1 MiB or more straight back
    to the system (a fixed mmap threshold). By default it raises that threshold up to 32 MB as
    large blocks are freed and keeps the freed ones for reuse, so a loop that frees one layer's
    buffers before the next grows by what it keeps (measured: ~100-200 MB on Llama-7B's
    shapes). Process-wide; a no-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # malloc.h
    mallopt(m_mmap_threshold, 1 << 20)


def meta_model(cls: type, config: object) -> nn.Module:
    """`cls(config)` with its parameters on the meta device and its buffers real (they are
    small and some, like rotary frequencies, are computed rather than stored)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config)
    if hasattr(model, "tie_weights"):  # the meta parameters are new objects: tie them again
        model.tie_weights()
    return model.eval()


def write_safetensors(
    path: Path,
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: the header from `specs` (name -> shape,
    dtype), then `produce(name)` for each name in `file_order`, checked against its spec:
    a tensor, or consecutive blocks of its rows (`TensorSource.pieces`)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    order = file_order(specs)
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        size = _numel(shape) * dtype.itemsize
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            shape, dtype = specs[name]
            made = produce(name)
            rows = 0
            for piece in [made] if torch.is_tensor(made) else made:
                if tuple(piece.shape[1:]) != tuple(shape[1:]) or piece.dtype != dtype:
                    raise RuntimeError(f"{name}: produced {tuple(piece.shape)} {piece.dtype}")
                rows += piece.shape[0] if piece.ndim else 1
                f.write(_bytes_of(piece))
            if rows != (shape[0] if shape else 1):
                raise RuntimeError(f"{name}: produced {rows} rows of {shape}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
