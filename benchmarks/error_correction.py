"""Error-correcting calibration (issue 11) on all-MiniLM-L6-v2: does refitting each factorized
layer on the inputs the compressed layers before it produce beat one-shot whitening?

Starts from the one-shot dlnc default at keep 0.5 (whiten with output-aware ranks and factors,
as benchmarks/quality.py's `Compressors.default`), then runs
`compressor.methods.sequential.correct_blocks` (what `dlnc compress --data` runs) with the
cross-Gram blended between the compressed inputs' own Gram (alpha 0: refit on X' only) and
the full correction towards the original layer's outputs (alpha 1; the default is
`ALPHA`, 0.5), each with
the default guard (layers with fewer than `TOKENS_PER_FEATURE` calibration tokens per input
feature keep their one-shot factors) and without it (`--guards 16 0`), and with or without the
held-out check of each refit (`--checks on off`). Held-out cosine /
probe accuracy as in quality.py; the same calibration paragraphs for the plan and the
correction.

    python benchmarks/error_correction.py [--calibration 64] [--alphas 0.5 1] [--guards 16 0]
                                          [--checks on off]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import quality as q  # benchmarks/ is the script folder, first on sys.path
import torch

from compressor.methods import sequential


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=64, help="calibration paragraphs")
    parser.add_argument("--alphas", type=float, nargs="+", default=[sequential.ALPHA, 1.0])
    parser.add_argument(
        "--guards",
        type=float,
        nargs="+",
        default=[sequential.TOKENS_PER_FEATURE],
        help="calibration tokens needed per input feature (0: refit every layer)",
    )
    parser.add_argument(
        "--checks",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="the held-out check of each refit (on: as dlnc compress)",
    )
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = q.MiniLMCase(args.calibration, 128)
    original, judge, batches, calib = case.original, case.judge, case.batches, case.calib
    comp = q.Compressors(original, batches(calib, 16))
    start, seconds = comp.one_shot(args.keep)
    _, sensitivity = comp.stats()
    print(f"{len(calib)} calibration paragraphs, keep {args.keep}; cosine / accuracy\n")
    print("| row | held-out cosine / probe accuracy | seconds |\n|---|---|---|")
    print(f"| dlnc default (one-shot) | {q.fmt(judge(start))} | {seconds:.0f} |")
    originals = comp.find(original)
    for alpha, guard, check in itertools.product(args.alphas, args.guards, args.checks):
        work = copy.deepcopy(start)
        t = time.perf_counter()
        done = sequential.correct_blocks(work, originals, batches(calib, 16), sensitivity,
                                         alpha=alpha, tokens_per_feature=guard,
                                         check=check == "on")  # fmt: skip
        row = (f"+ refit, alpha {alpha}, {guard:g} tokens/feature ({done.tokens}), check "
               f"{check}: {len(done.refit)} of {len(originals)} layers refit")  # fmt: skip
        seconds = time.perf_counter() - t
        print(f"| {row} | {q.fmt(judge(work))} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
