"""The speed-aware plan: what the targeted layers' shapes cost on this device, dense and
factorized, measured once and cached; the ranks no slower than dense; the expected speed-up.

`kernel_curves` times each (shape, rows) pair of `core.kernels.ROWS` (decode at batch 1 and
8, a prefill block) on the device the run uses, in the targets' dtype, and keeps the curves
in `<dlnc cache>/kernels-v2.json` under a key naming the device, its threads, the dtype and the
torch version: a second run on the same machine reads them back. `speed_policy` turns a
`speed="never-slower"` policy's shapes into caps (`RankPolicy.caps`); `expected_speed` is
what a report says beside the parameter count.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from compressor.core.kernels import (
    ROWS,
    KernelCurve,
    Timer,
    best_seconds,
    expected_speedup,
    measure_curve,
    speed_cap,
)
from compressor.core.progress import ProgressFn, report
from compressor.core.ranks import RankPolicy
from compressor.errors import DlncError
from compressor.io.files import atomic_path
from compressor.io.streaming import TensorSource
from compressor.training.generated import default_cache_dir

__all__ = [
    "device_key",
    "expected_speed",
    "kernel_curves",
    "serving_dtype",
    "speed_device",
    "speed_policy",
]

Shape = tuple[int, int]

CACHE_FILE = "kernels-v2.json"
"""The curves' cache; its number changes with the measuring rule, so curves timed by an older
rule are measured again (v2: each rank against the dense time beside it)."""


def speed_device(device: str | None) -> torch.device:
    """Where speed is measured: the run's device (None: the GPU if there is one)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def serving_dtype(weight_files: Iterable[Path]) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its first floating tensor's), the one
    its export keeps and is served in; float32 when there is none to read (pickles)."""
    files = [Path(f) for f in weight_files if Path(f).suffix == ".safetensors"]
    specs = TensorSource(files).specs.values() if files else ()
    return next((s.dtype for s in specs if s.dtype.is_floating_point), torch.float32)


def device_key(device: torch.device, dtype: torch.dtype) -> str:
    """What the timings depend on: the processor, its threads (and on a CPU OpenMP's wait
    policy where one is set: passive threads sleep between kernels, which made a small matmul
    2-5x slower on 2 threads), the dtype, torch's version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() + f", {torch.get_num_threads()} threads"
        if policy := os.environ.get("OMP_WAIT_POLICY"):
            name += f", OMP_WAIT_POLICY={policy}"
    return f"{device.type}: {name}; {str(dtype).removeprefix('torch.')}; torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_curves(
    shapes: Iterable[Shape],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    timer: Timer | None = None,
    progress: ProgressFn | None = None,
) -> dict[tuple[Shape, int], KernelCurve]:
    """A curve per (shape, rows) for every shape at every row count of `ROWS`, read from the
    cache where this device has them, measured by `timer` (`best_seconds`) and cached where
    not. (Timings taken on a busy machine are kept too: delete the file to measure again.)"""
    path = (cache_dir or default_cache_dir()) / CACHE_FILE
    key = device_key(device, dtype)
    cache = _read(path)
    known = cache.get(key, {})
    curves, missing = {}, []
    for shape in sorted(set(map(tuple, shapes))):
        for rows in ROWS:
            entry = known.get(_entry(shape, rows))
            if entry is not None:
                curves[shape, rows] = KernelCurve.from_dict(shape, rows, entry)
            else:
                missing.append((shape, rows))
    for i, (shape, rows) in enumerate(missing):
        curves[shape, rows] = measure_curve(shape, rows, device, dtype, timer or best_seconds)
        known[_entry(shape, rows)] = curves[shape, rows].to_dict()
        report(progress, "timing kernels", i + 1, len(missing))
    if missing:
        cache = _read(path)  # another run may have written meanwhile
        cache.setdefault(key, {}).update(known)
        _write(path, cache)
    return curves


def _entry(shape: Shape, rows: int) -> str:
    return f"{shape[0]}x{shape[1]}@{rows}"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a broken one: measured again and rewritten


def _write(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(cache, indent=1))
    except (OSError, DlncError):
        pass  # a cache that cannot be written only costs time


def speed_policy(
    policy: RankPolicy,
    shapes: Mapping[str, Shape],
    device: str | None,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> RankPolicy:
    """`policy` with its caps measured when it asks for never-slower ranks; else as given."""
    if policy.speed != "never-slower":
        return policy
    curves = kernel_curves(shapes.values(), speed_device(device), dtype, progress=progress)
    caps = {
        shape: speed_cap([curves[shape, rows] for rows in ROWS], policy.multiple)
        for shape in set(map(tuple, shapes.values()))
    }
    return replace(policy, caps=caps)


def expected_speed(
    layers: Mapping[str, tuple[Shape, int | None]],
    device: str | None,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> dict:
    """The expected speed-up over dense of `layers` ({name: (shape, rank, None if dense)})
    at each row count of `ROWS`, from their kernel curves (measured or cached); how many of
    them run slower than dense at some row count; the device it holds for."""
    dev = speed_device(device)
    layers = {n: (tuple(shape), rank) for n, (shape, rank) in layers.items()}
    curves = kernel_curves([shape for shape, _ in layers.values()], dev, dtype, progress=progress)
    speedup = {
        f"rows_{rows}": float(f"{expected_speedup(layers, curves, rows):.4g}") for rows in ROWS
    }
    slower = sum(
        any(curves[shape, r].at(rank) > curves[shape, r].dense for r in ROWS)
        for shape, rank in layers.values()
        if rank is not None
    )
    return {"device": device_key(dev, dtype), "speedup": speedup, "slower_layers": slower}
