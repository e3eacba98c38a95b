"""Benchmark (issue 28 item 3): a factorized export served by ONNX Runtime, beside the dense model.

SmolLM2-135M (float32) dense, and compressed with `dlnc compress --keep 0.5` and `--keep 0.8`
(no data: the ranks and factors do not change the speed), each written with `dlnc onnx`, then
run by onnxruntime on the CPU with --threads intra-op threads: the ONNX file's size and the
prefill latency of 1 x --tokens tokens (the logits of every position, no KV cache), best of
--repeats after a warm-up run. The runs alternate between the models, so a busy machine slows
them alike. Exports and ONNX files already in --work are reused.

    python benchmarks/onnx_latency.py [--model /tmp/dlnc-smollm2/f32] [--work /tmp/dlnc-onnx]
                                      [--keeps 0.5 0.8] [--threads 2] [--tokens 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent


def make_export(model: Path, keep: float, out: Path) -> Path:
    """`dlnc compress MODEL --keep K --out OUT`, unless OUT is there already."""
    if not out.exists():
        command = [sys.executable, "-m", "cli", "compress", str(model), "--keep", str(keep),
                   "--out", str(out)]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def make_onnx(folder: Path, out: Path) -> Path:
    """`dlnc onnx FOLDER --out OUT` (checked against onnxruntime), unless OUT is there."""
    if not out.exists():
        command = [sys.executable, "-m", "cli", "onnx", str(folder), "--out", str(out)]
        subprocess.run(command, check=True, cwd=ROOT)
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prefill_times(sessions: dict, tokens: int, repeats: int) -> dict[str, float]:
    """Best seconds per model for one 1 x `tokens` forward pass, after one warm-up each;
    the models take turns."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 49152, (1, tokens), dtype=np.int64),
             "attention_mask": np.ones((1, tokens), dtype=np.int64)}  # fmt: skip
    best = {name: float("inf") for name in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/dlnc-smollm2/f32"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dlnc-onnx"))
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {"dense": args.model}
    for keep in args.keeps:
        folders[f"keep {keep}"] = make_export(args.model, keep, args.work / f"keep-{keep}")
    files = {name: make_onnx(folder, args.work / f"{name.replace(' ', '-')}.onnx")
             for name, folder in folders.items()}  # fmt: skip
    sessions = {name: session(path, args.threads) for name, path in files.items()}
    best = prefill_times(sessions, args.tokens, args.repeats)
    print(f"\nONNX Runtime, CPU, {args.threads} threads: prefill 1 x {args.tokens} tokens, "
          f"best of {args.repeats} after a warm-up\n")  # fmt: skip
    print("| model | ONNX file | prefill ms | vs dense |\n|---|---:|---:|---:|")
    for name, path in files.items():
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        ms = best[name] * 1e3
        print(f"| {name} | {size / 1e6:.1f} MB | {ms:.1f} | {best['dense'] / best[name]:.2f}x |")


if __name__ == "__main__":
    main()
