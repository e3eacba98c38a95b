"""PNG figures (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "LOSS_PLOT",
    "check_plot_path",
    "plot_losses",
    "plot_report",
    "plot_spectra",
    "write_loss_plot",
]

LOSS_PLOT = "loss.png"
"""The loss curve's file name, beside report.json in a fine-tuned export."""


def check_plot_path(path: str | os.PathLike) -> None:
    """Raise a `DlncError` naming `--plot` unless matplotlib can write `path` (by its
    extension) into an existing, writable folder: checked before any work starts."""
    from matplotlib.backend_bases import FigureCanvasBase

    from compressor.errors import DlncError

    formats = FigureCanvasBase.get_supported_filetypes()
    kind = Path(path).suffix.lstrip(".").lower()
    if kind not in formats:
        raise DlncError(
            f"--plot {path}: unsupported image type {kind or '(none)'!r}; "
            f"use one of {', '.join(sorted(formats))}"
        )


def plot_spectra(
    spectra: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    ranks: Mapping[str, int | None] | None = None,
    title: str = "Normalized singular values",
) -> None:
    """Normalized spectra (s_i / s_1) per layer on a log scale, chosen ranks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in spectra.items():
        s = s.double()
        ax.semilogy(range(1, s.numel() + 1), (s / s[0].clamp_min(1e-30)).numpy(), lw=0.8)
        energy = (s.square().cumsum(0) / s.square().sum().clamp_min(1e-30)).numpy()
        bx.plot(range(1, s.numel() + 1), energy, lw=0.8, label=_short(name))
        rank = (ranks or {}).get(name)
        if rank:
            bx.plot([rank], [energy[rank - 1]], "k.", ms=4)
    ax.set(title=title, xlabel="index i", ylabel="s_i / s_1")
    bx.set(title="Cumulative energy (dots: chosen ranks)", xlabel="rank k", ylabel="energy kept")
    if len(spectra) <= 12:
        bx.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def plot_losses(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """The training loss per step (report.json's `finetune.history`), with the learning rate
    on a second axis when it was recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["loss"] for h in history], lw=1, color="C0")
    ax.set(title=title or "Fine-tuning loss", xlabel="step", ylabel="training loss")
    if all(h["loss"] > 0 for h in history):
        ax.set_yscale("log")
    if history and all(h.get("lr") is not None for h in history):
        lr_axis = ax.twinx()
        lr_axis.plot(steps, [h["lr"] for h in history], lw=0.8, ls="--", color="C1")
        lr_axis.set_ylabel("learning rate (dashed)")
    fig.tight_layout()
    save_figure(fig, path)


def write_loss_plot(report: dict, out_dir: Path) -> Path | None:
    """`LOSS_PLOT` beside an export's report.json: the loss (and lr) of every fine-tuning
    step; None (and nothing written) when the report has no fine-tuning history."""
    history = (report.get("finetune") or {}).get("history")
    if not history:
        return None
    plot_losses(history, out_dir / LOSS_PLOT, title=f"Fine-tuning loss ({out_dir.name})")
    return out_dir / LOSS_PLOT


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write (and close) the figure through a temp file: a full disk leaves no
    half-written image."""
    import matplotlib.pyplot as plt

    from compressor.io.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def plot_report(
    spectra: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int | None],
    losses: list[float],
    path: str | os.PathLike,
    title: str = "dlnc report",
    stages: Mapping[str, float] | None = None,
) -> None:
    """One PNG: normalized spectra with the chosen ranks, the fine-tuning loss curve and, with
    `stages` (stage -> test accuracy), a bar per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if stages else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax, bx = axes[0], axes[1]
    for name, s in spectra.items():
        s = s.double()
        (line,) = ax.semilogy(range(1, s.numel() + 1), (s / s[0].clamp_min(1e-30)).numpy(), lw=1)
        rank = ranks.get(name)
        label = f"{_short(name)}: rank {rank if rank else 'dense'}"
        line.set_label(label)
        if rank:
            ax.axvline(rank, color=line.get_color(), ls="--", lw=0.8)
    ax.set(title="Spectra (s_i / s_1) and chosen ranks (dashed)", xlabel="index i")
    ax.legend(fontsize=7)
    if losses:
        bx.plot(range(1, len(losses) + 1), losses, lw=1)
        bx.set_yscale("log")
    bx.set(title="Recovery fine-tuning loss", xlabel="step", ylabel="loss")
    if stages:
        cx = axes[2]
        bars = cx.bar(list(stages), list(stages.values()), color=["C0", "C3", "C2"][: len(stages)])
        cx.bar_label(bars, fmt="%.3f")
        cx.set(title="Test accuracy", ylim=(0, 1.05))
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
