"""Reproduce docs/method.md section 2: wide vs compressed DLN on matrix recovery, plus the MLP.

Runs the three settings of docs/method.md's table, the larger completion setting (d=1000) and the
digits MLP; prints a table, writes it as markdown and draws one recovery plot per setting.

    python benchmarks/dln_recovery.py                      # everything (long on 2 CPU cores)
    python benchmarks/dln_recovery.py --only completion    # one setting
    python benchmarks/dln_recovery.py --quick              # smaller caps, for a smoke run

Iteration caps (`max_iters`) are set per setting so the whole run fits a CPU; a run that hits
its cap is marked "not reached" and its time is the time of the capped run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from compressor.dln.experiment import (
    DLNBenchConfig,
    DLNBenchResult,
    build_networks,
    resolve_device,
    run_dln_benchmark,
)
from compressor.dln.mlp import MLPConfig, run_mlp
from compressor.dln.plots import plot_recovery
from compressor.dln.problems import ProblemConfig, make_problem
from compressor.dln.train import TrainConfig, train

SETTINGS = {
    "factorization": DLNBenchConfig(
        ProblemConfig("factorization", d=100, r=10),
        TrainConfig(eta=1.0, max_iters=150_000, log_every=500),
        alpha=1.0,
    ),
    "completion": DLNBenchConfig(
        ProblemConfig("completion", d=100, r=5, observed=0.3),
        TrainConfig(eta=10.0, max_iters=20_000, log_every=50),
        alpha=5.0,
    ),
    "sensing": DLNBenchConfig(
        ProblemConfig("sensing", d=200, r=5, measurements=4000),
        TrainConfig(eta=20.0, max_iters=2_000, log_every=25),
        alpha=1.0,
    ),
    # sensing at half the paper's size (same oversampling m / (d r)): the 1.3 GB operator of the
    # paper's setting makes each step cost ~1 s on a loaded 2-core machine, for both networks
    "sensing-100": DLNBenchConfig(
        ProblemConfig("sensing", d=100, r=5, measurements=2000),
        TrainConfig(eta=20.0, max_iters=3_000, log_every=25),
        alpha=1.0,
    ),
    # law-of-parsimony scale: the wide network costs ~0.2 s a step on 2 cores, so it is capped
    "completion-1000": DLNBenchConfig(
        ProblemConfig("completion", d=1000, r=5, observed=0.2),
        TrainConfig(eta=2000.0, max_iters=3_000, log_every=100),
        eps=1e-3,
        alpha=1.0,
    ),
}
WIDE_CAP = {"completion-1000": 100}  # iterations the wide network gets where it is capped

PAPER = {
    "factorization": "about 2.3x faster in wall time",
    "completion": "wide ~14,900 steps, compressed ~4,100; >20x wall time; test rel. err ~1.4e-5",
    "sensing": "compressed faster (figure); no number in docs/method.md",
    "sensing-100": "(reduced-size sensing; not in the paper)",
    "completion-1000": "law-of-parsimony scale (GPU); no number in docs/method.md",
}


def run_setting(name: str, config: DLNBenchConfig, img_dir: Path) -> dict:
    """Both networks on one setting; the wide one may get a smaller iteration cap."""
    print(f"== {name}: {config.problem} eta={config.train.eta} alpha={config.alpha}", flush=True)
    if name in WIDE_CAP:
        return _run_capped(name, config, img_dir)
    result = run_dln_benchmark(config, _printer("wide"), _printer("compressed"))
    plot_recovery(result, img_dir / f"dln_{name}.png", title=_title(name, config))
    return result.to_dict()


def _run_capped(name: str, config: DLNBenchConfig, img_dir: Path) -> dict:
    """Same problem and networks, but the wide run stops at WIDE_CAP[name] iterations."""
    problem = make_problem(config.problem, torch.float64, resolve_device(config.device))
    wide, compressed = build_networks(config, problem)
    wide_train = replace(config.train, max_iters=WIDE_CAP[name])
    result = DLNBenchResult(
        wide=train(wide, problem, wide_train, _printer("wide")),
        compressed=train(compressed, problem, config.train, _printer("compressed")),
        wide_parameters=wide.num_parameters(),
        compressed_parameters=compressed.num_parameters(),
    )
    plot_recovery(result, img_dir / f"dln_{name}.png", title=_title(name, config))
    return result.to_dict()


def _title(name: str, c: DLNBenchConfig) -> str:
    return f"{name}: d={c.problem.d}, r={c.problem.r}, L={c.depth}, eta={c.train.eta}"


def _printer(label: str):
    """Print the training loss about ten times per run."""
    last = [-1]

    def callback(step: int, total: int, info: dict) -> None:
        if step * 10 // total > last[0]:
            last[0] = step * 10 // total
            print(f"  {label:<10} {step:>7}/{total}  loss {info['train_loss']:.3e}", flush=True)

    return callback


def dln_rows(name: str, result: dict) -> list[str]:
    rows = []
    for net in ("wide", "compressed"):
        r = result[net]
        iters = f"{r['iterations']}" + ("" if r["reached_target"] else " (cap, not reached)")
        rows.append(
            f"| {name} | {net} | {r['parameters']} | {iters} | {r['seconds']:.2f} | "
            f"{r['ms_per_step']:.3f} | {r['final_train_loss']:.2e} | {r['final_test_error']:.2e} | "
            f"{r['final_recovery_error']:.2e} |"
        )
    rows.append(
        f"| {name} | **speedup** | | **{result['speedup_iterations']:.2f}x** | "
        f"**{result['speedup_seconds']:.2f}x** | | | | |"
    )
    return rows


def mlp_rows(result) -> list[str]:
    rows = [
        f"| digits MLP | {name} | {run.chain_parameters} | {run.test_accuracy:.4f} | "
        f"{run.train_accuracy:.4f} | {run.seconds:.2f} |"
        for name, run in (("wide", result.wide), ("compressed", result.compressed))
    ]
    rows.append(f"| digits MLP | **speedup** | | | | **{result.speedup_seconds:.2f}x** |")
    return rows


DLN_HEADER = [
    "| setting | network | params | iterations to loss < 1e-12 | seconds | ms/step | "
    "train loss | test error | recovery error |",
    "|---|---|---|---|---|---|---|---|---|",
]
MLP_HEADER = [
    "| experiment | chain | chain params | test acc | train acc | seconds |",
    "|---|---|---|---|---|---|",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=[*SETTINGS, "mlp"], help="settings to run")
    parser.add_argument("--quick", action="store_true", help="caps divided by 10")
    parser.add_argument("--markdown", type=Path, default=Path("docs/img/dln_recovery.md"))
    parser.add_argument("--img-dir", type=Path, default=Path("docs/img"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # 1: small matmuls gain nothing from a second thread
    args.img_dir.mkdir(parents=True, exist_ok=True)
    chosen = args.only or ["completion", "factorization", "completion-1000", "mlp", "sensing"]
    dln_lines, mlp_lines, results = list(DLN_HEADER), [], {}
    for name in chosen:
        if name == "mlp":
            mlp = run_mlp(MLPConfig(width=512, r=8, epochs=20 if args.quick else 200))
            mlp_lines = ["", *MLP_HEADER, *mlp_rows(mlp)]
        else:
            config = SETTINGS[name]
            if args.quick:
                capped = replace(config.train, max_iters=config.train.max_iters // 10)
                config = replace(config, train=capped)
            results[name] = run_setting(name, config, args.img_dir)
            dln_lines += dln_rows(name, results[name])
        lines = dln_lines + mlp_lines
        _write(args.markdown, lines, results)  # after each setting, so a long run keeps its rows
    print("\n".join(lines))


def _write(path: Path, lines: list[str], results: dict) -> None:
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
