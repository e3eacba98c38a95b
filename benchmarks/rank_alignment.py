"""Benchmark (issue 27): do the matmul kernels here like ranks that are multiples of 8, 16 or 64?

For each layer shape (SmolLM2-135M's and a 1B Llama's) and each row count of
`compressor.core.kernels.ROWS` (decode at batch 1 and 8, a prefill block), a factorized layer
(`FactorizedLinear`, what an export runs) is timed at every rank of a window of 64 around 40%
of its width. Each rank's time is divided by the straight line fitted through all of them
(time grows with the rank), and the table gives the median of that ratio per alignment class:
below 1.00 a class runs faster than its rank predicts. `--multiple` is worth setting where
a class is clearly below 1 at the row counts that matter.

    python benchmarks/rank_alignment.py [--threads 2] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from compressor.core.kernels import ROWS, best_seconds
from compressor.core.layers import FactorizedLinear
from compressor.workflows.speed import DTYPES

SHAPES = {
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "1b q/o 2048x2048": (2048, 2048),
    "1b up 8192x2048": (8192, 2048),
}
CLASSES = ("64", "16, not 64", "8, not 16", "not 8")


def alignment(rank: int) -> str:
    for multiple, label in ((64, CLASSES[0]), (16, CLASSES[1]), (8, CLASSES[2])):
        if rank % multiple == 0:
            return label
    return CLASSES[3]


def ratios(shape: tuple[int, int], rows: int, device: str, dtype: torch.dtype) -> dict:
    """Median time / fitted time per alignment class over a window of 64 ranks."""
    out_f, in_f = shape
    start = 64 * max(1, round(0.4 * min(shape) / 64)) - 32
    ranks = list(range(start, start + 65))
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    times = []
    for rank in ranks:
        layer = FactorizedLinear(in_f, out_f, rank, device=device, dtype=dtype)
        times.append(best_seconds(layer, x))
    fit = torch.linalg.lstsq(
        torch.tensor([[1.0, r] for r in ranks], dtype=torch.float64),
        torch.tensor(times, dtype=torch.float64).unsqueeze(1),
    ).solution.flatten()
    by_class: dict[str, list[float]] = {c: [] for c in CLASSES}
    for rank, t in zip(ranks, times, strict=True):
        by_class[alignment(rank)].append(t / float(fit[0] + fit[1] * rank))
    return {c: statistics.median(v) for c, v in by_class.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"| shape ({args.device}, {args.dtype}, {args.threads} threads) | rows | "
          + " | ".join(f"x{c}" for c in CLASSES) + " |")  # fmt: skip
    print("|---|---:|" + "---:|" * len(CLASSES))
    for label, shape in SHAPES.items():
        for rows in ROWS:
            r = ratios(shape, rows, args.device, dtype)
            cells = " | ".join(f"{r[c]:.3f}" if c in r else "" for c in CLASSES)
            print(f"| {label} | {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
