"""`dlnc demo`: the whole pipeline on an embedded default, with nothing to download.

A deliberately wide MLP is trained for a few seconds on scikit-learn's handwritten digits
(real data shipped with that package) and saved as a checkpoint. Then, as a user would:
inspect its spectra, estimate ranks from a short warm-up run (the learning dynamics),
compress with a spectral initialization in the joint subspace of the weight and its update,
fine-tune the deep chains (distillation + task loss, discrepant outer learning rate), export,
reload, and compare the three stages: the wide network, the compressed one (the cut is deep
enough to cost accuracy) and the fine-tuned one (which wins most of it back). The library
reports progress through a callback.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from compressor.core.compress import compress_, layer_spectra
from compressor.core.linalg import effective_rank, energy_rank, singular_values
from compressor.core.progress import ProgressFn
from compressor.core.ranks import RankPolicy
from compressor.core.surgery import collapse_, count_params
from compressor.core.targets import find_targets
from compressor.dln.mlp import load_digits_split
from compressor.errors import DlncError
from compressor.io.export import disk_size, export
from compressor.io.files import check_writable, write_error
from compressor.io.load import load_pretrained
from compressor.methods import build_plan
from compressor.methods.dynamics import warmup_updates
from compressor.training.loop import FinetuneConfig, finetune

__all__ = ["DemoResult", "DemoSettings", "WideMLP", "run_demo"]

MARKER = ".dlnc-demo"  # marks a folder the demo wrote, so a re-run may replace it


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets of the demo; `fast()` is the setting the test suite runs."""

    width: int = 1024  # hidden width of the wide network
    epochs: int = 30  # training epochs of the wide network
    warmup_steps: int = 40  # warm-up steps whose updates reveal each layer's rank
    keep: float = 0.03  # fraction of the targeted weight parameters kept (a cut that costs)
    depth: int = 3  # chain depth while fine-tuning (export collapses to 2)
    finetune_steps: int = 300  # recovery fine-tuning steps
    finetune_lr: float = 1e-4  # peak lr of the recovery (AdamW); 1e-3 kicks the model off
    outer_lr_scale: float = 2.0  # discrepant learning rate of the outer factors
    seed: int = 0

    @classmethod
    def fast(cls) -> DemoSettings:
        return cls(width=256, epochs=12, warmup_steps=20, keep=0.08, finetune_steps=60)


class WideMLP(nn.Module):
    """64 pixels -> width -> width -> 10 digits, ReLU; forward(x) returns logits."""

    dlnc_task = "classification"  # tells the fine-tuning objectives what the logits are

    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(h))
        return self.head(F.relu(self.fc3(h)))


@dataclass
class DemoResult:
    """The three stages' numbers, per-layer ranks, and where things were written."""

    rows: list[tuple[str, str, str, str]]  # (measure, wide, compressed, fine-tuned)
    ranks: dict[str, int | None]
    spectra: dict[str, torch.Tensor]
    losses: list[float]
    out_dir: Path
    wide_accuracy: float
    compressed_accuracy: float  # before fine-tuning
    finetuned_accuracy: float
    wide_params: int
    compressed_params: int
    layers: list[dict] = field(default_factory=list)  # per layer: ranks seen and chosen


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, progress: ProgressFn | None = None
) -> DemoResult:
    """Run the whole pipeline; writes `out_dir/{wide,compressed}` and returns the numbers."""
    settings = settings or DemoSettings()
    out = Path(out_dir)
    _fresh_folder(out)
    try:  # a failed demo leaves no half-written folder
        return _run(out, settings, progress or _silent)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(out, ignore_errors=True)
        raise write_error(out, e) from e
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _run(out: Path, settings: DemoSettings, progress: ProgressFn) -> DemoResult:
    torch.manual_seed(settings.seed)
    train, test = digits(settings.seed)
    # 1) a "pretrained" wide network, saved as a checkpoint
    wide = train_wide(train, settings, progress)
    export_wide(wide, out / "wide")
    # 2) inspect: the spectrum of every targeted layer
    student = copy.deepcopy(wide)
    targets = find_targets(student)
    spectra = layer_spectra(targets, progress)
    # 3) ranks from the learning dynamics of a short warm-up run
    batches = make_batches(train, 64, settings.seed)
    updates = warmup_updates(
        student, targets, batches, settings.warmup_steps, _warmup_loss, lr=1e-3, progress=progress
    )
    plan = build_plan("dynamics", targets, updates=updates, progress=progress)
    # 4) compress: spectral initialization in the joint subspace, ranks under the budget
    report = compress_(
        student, targets, RankPolicy(keep=settings.keep), settings.depth,
        "dynamics", spectra=plan.spectra, factor_fn=plan.factor_fn, progress=progress,
    )  # fmt: skip
    before_ft = accuracy(student, test)
    layers = layer_rows(plan, updates, report)
    # 5) recover: distillation from the wide network plus the task loss
    losses = recover(student, wide, batches, settings, progress)
    # 6) export (the chains collapse to two factors), reload, evaluate
    collapse_(student)
    exported = export(student, out / "compressed", report=report.to_dict(), method="dynamics")
    reloaded = load_pretrained(exported, model=WideMLP(settings.width))
    _check_identical(reloaded, student, test)
    rows, accs = _table(wide, reloaded, before_ft, out, test)
    return DemoResult(
        rows=rows,
        ranks={r.name: r.rank for r in report.layers},
        spectra=spectra,
        losses=losses,
        out_dir=out,
        wide_accuracy=accs[0],
        compressed_accuracy=before_ft,
        finetuned_accuracy=accs[1],
        wide_params=count_params(wide),
        compressed_params=count_params(reloaded),
        layers=layers,
    )


def _silent(stage: str, done: int, total: int, /, **metrics: float) -> None:
    """The progress callback of a caller that does not listen."""


def digits(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """scikit-learn's handwritten digits (the research core's loader), split 75/25, as
    `{"x", "labels"}` dicts."""
    x_train, y_train, x_test, y_test = load_digits_split(0.25, seed)
    return {"x": x_train, "labels": y_train}, {"x": x_test, "labels": y_test}


def make_batches(data: dict[str, torch.Tensor], size: int, seed: int) -> list[dict]:
    order = torch.randperm(len(data["x"]), generator=torch.Generator().manual_seed(seed))
    return [
        {k: v[order[i : i + size]] for k, v in data.items()} for i in range(0, len(order), size)
    ]


def train_wide(train: dict, settings: DemoSettings, progress: ProgressFn) -> WideMLP:
    model = WideMLP(settings.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(settings.epochs):
        for batch in make_batches(train, 64, settings.seed + epoch):
            loss = F.cross_entropy(model(batch["x"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        progress("train wide", epoch + 1, settings.epochs)
    return model.eval()


def export_wide(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )


def recover(student, teacher, batches, settings: DemoSettings, progress: ProgressFn) -> list[float]:
    config = FinetuneConfig(
        steps=settings.finetune_steps, lr=settings.finetune_lr,
        outer_lr_scale=settings.outer_lr_scale,
        objective="mix", objective_params={"mix_weight": 0.5, "temperature": 2.0}, warmup=0.05,
        seed=settings.seed,
    )  # fmt: skip

    result = finetune(student, batches, teacher=teacher, config=config, progress=progress)
    student.eval()
    return result.losses


def layer_rows(plan, updates, report) -> list[dict]:
    """What the demo shows per layer: the weight's ranks, the update's, and the choice."""
    return [
        {
            "name": r.name,
            "shape": r.shape,
            "weight_effective_rank": effective_rank(plan.weight_spectra[r.name]),
            "weight_r90": energy_rank(plan.weight_spectra[r.name], 0.9),
            "update_r90": energy_rank(singular_values(updates[r.name]), 0.9),
            "rank": r.rank,
            "breakeven": r.breakeven,
        }
        for r in report.layers
    ]


def _warmup_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["labels"])


@torch.no_grad()
def accuracy(model: nn.Module, data: dict) -> float:
    model.eval()
    return float((model(data["x"]).argmax(-1) == data["labels"]).float().mean())


def latency(model: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    """Best of `repeats` forward passes (the least disturbed by other work on the machine)."""
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return min(times)


def _check_identical(reloaded: nn.Module, student: nn.Module, test: dict) -> None:
    with torch.no_grad():
        if not torch.equal(reloaded(test["x"]), student(test["x"])):
            raise RuntimeError("the reloaded export does not reproduce the fine-tuned model")


def _table(wide, compressed, before_ft: float, out: Path, test: dict):
    x = test["x"].repeat(8, 1)[:2048]
    acc = accuracy(wide, test), accuracy(compressed, test)
    lat = latency(wide, x), latency(compressed, x)
    size = disk_size(out / "wide" / "model.safetensors"), _weights(out / "compressed")
    params = f"{count_params(compressed):,}"
    mb = f"{size[1] / 1e6:.2f} MB"
    ms = f"{lat[1] * 1e3:.2f} ms"  # the fine-tuned model has the compressed one's layers
    rows = [
        ("parameters", f"{count_params(wide):,}", params, params),
        ("bytes on disk", f"{size[0] / 1e6:.2f} MB", mb, mb),
        ("test accuracy", f"{acc[0]:.3f}", f"{before_ft:.3f}", f"{acc[1]:.3f}"),
        ("CPU latency, 2048 digits", f"{lat[0] * 1e3:.2f} ms", ms, ms),
    ]
    return rows, acc


def _weights(folder: Path) -> int:
    return disk_size(sorted(folder.glob("*.safetensors")))


def _fresh_folder(out: Path) -> Path:
    """The demo's own folder: created, or replaced when an earlier demo wrote it."""
    if out.exists():
        if not (out / MARKER).exists():
            raise DlncError(f"{out} exists and was not written by dlnc demo; pick another `out`")
        shutil.rmtree(out)
    check_writable(out)
    out.mkdir(parents=True)
    try:
        (out / MARKER).write_text("written by dlnc demo; a new run replaces this folder\n")
    except OSError as e:
        shutil.rmtree(out, ignore_errors=True)
        raise write_error(out, e) from e
    return out
