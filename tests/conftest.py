"""Shared fixtures: tiny models of each supported family (the table in `tiny_models.py`),
built from configs and saved to tmp_path (no hub). `tiny_model(family)` returns (model, folder).
`build_tiny`, `example_inputs` and `MLP` are re-exported for the suites that import them here."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import MLP, build_tiny, example_inputs, save_tiny
from torch import nn

__all__ = ["MLP", "build_tiny", "example_inputs"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("gpt2", "bert", "llama", "vit")
"""The families every export test covers (all of `tiny_models.TINY_MODELS` is the full list)."""


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def dlnc_cache(tmp_path_factory, monkeypatch) -> Path:
    """dlnc's cache (generated calibration text) in a folder of the test session's, never the
    user's home."""
    folder = tmp_path_factory.getbasetemp() / "dlnc-cache"
    monkeypatch.setenv("DLNC_CACHE", str(folder))
    return folder


def kernel_seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """Seconds per call of a layer under a fixed cost model, its multiply-adds at 1e10 per
    second (no cost per kernel: a factorized layer is faster exactly below break-even, so
    the plain plan ships no slower layer): what the speed-aware plan reads in tests."""
    weights = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight"))
    return x.shape[0] * weights / 1e10


@pytest.fixture(autouse=True)
def kernel_cost_model(monkeypatch):
    """The speed-aware plan's timings come from `kernel_seconds`, not from this (shared, busy)
    machine: reports are reproducible and the suite does not spend its time on matmul timing.
    (`tests/test_kernels.py` checks the timer and the plan on exact costs.)"""
    from compressor.workflows import speedplan

    monkeypatch.setattr(speedplan, "best_seconds", kernel_seconds)


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: thread start-up costs more than it saves, worst on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., tuple[nn.Module, Path]]:
    """`tiny_model(family, **config_overrides)`: (the model, its folder under tmp_path)."""

    def make(family: str, **overrides) -> tuple[nn.Module, Path]:
        return save_tiny(family, tmp_path / family, **overrides)

    return make


@pytest.fixture
def tiny_mlp(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A plain MLP saved as a bare model.safetensors with no config.json."""
    return save_tiny("mlp", tmp_path / "mlp")


def tree_snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size and mtime: to prove nothing was touched."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def gpt2(tiny_model) -> Path:
    """The folder of a saved tiny GPT-2."""
    return tiny_model("gpt2")[1]


@pytest.fixture
def exported(tiny_model, tmp_path) -> Path:
    """A tiny GPT-2 compressed at rank 4 by `dlnc compress`: the export's folder."""
    from cli_helpers import dlnc

    _, folder = tiny_model("gpt2")
    result = dlnc("compress", folder, "--rank", 4, "--out", tmp_path / "exp")
    assert result.exit_code == 0, result.output
    return tmp_path / "exp"


@pytest.fixture
def no_loading(monkeypatch):
    """Make any checkpoint load fail the test: the error must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the options were checked")

    # every module that binds load_checkpoint at import is imported (and patched) before the
    # source is, so none keeps the refusing stand-in after the test
    modules = ("compressor.workflows.compress", "compressor.workflows.estimate",
               "compressor.workflows.plan", "cli.inspect", "compressor.io.checkpoint")  # fmt: skip
    for module in modules:
        monkeypatch.setattr(f"{module}.load_checkpoint", refuse, raising=False)
