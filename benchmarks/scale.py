"""Benchmark (issue 12): compress and reload a Llama-7B-shaped slice without holding the model.

Writes a Llama-7B-shaped checkpoint (hidden 4096, intermediate 11008, 32 heads, no GQA, vocab
32000, random bf16 weights, 1 GB shards) with `--layers` decoder layers to a temp folder, then
runs each step in a fresh process and reads that process's own peak RSS (ru_maxrss):
  baseline   imports (SciPy's too) + the meta-device model tree: the fixed overhead
  stream     data-free --keep 0.5 on every projection, streamed (`--stream`)
  whiten     --method whiten, streamed block by block on `--samples` x 128 calibration tokens
  correct    the same with error-correcting calibration (a layer is refit with 16 tokens per
             input feature: `--hidden 1024 --intermediate 2752 --samples 128` refits the
             attention and gate/up projections)
  memory     the same as stream through the in-memory path (slow: one full SVD per layer)
  reload     load_pretrained of the export
Prints a table; per-layer time is the difference between the smallest and the largest slice
over the layers added, projected to 32 layers.

    python benchmarks/scale.py --layers 2 4 [--steps stream whiten correct memory reload]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HIDDEN, INTERMEDIATE = 4096, 11008
LARGEST_LAYER_BYTES = HIDDEN * INTERMEDIATE * 2  # gate/up/down in bf16

CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
step, src, out, device, data = sys.argv[1:6]
if step == "baseline":  # what every run holds whatever the model's size (SciPy's LAPACK too)
    from compressor.io.streaming import meta_model
    import compressor.workflows.stream, transformers, scipy.linalg, threadpoolctl
    cfg = transformers.AutoConfig.from_pretrained(src)
    meta_model(transformers.LlamaForCausalLM, cfg)
elif step in ("stream", "memory", "whiten", "correct"):
    from compressor.core.ranks import RankPolicy
    from compressor.training.data import DataOptions
    from compressor.options import CompressOptions, ExportOptions, MethodOptions, RunOptions
    from compressor.workflows.compress import compress_checkpoint
    aware = None
    if step in ("whiten", "correct"):
        aware = MethodOptions(method="whiten", data=DataOptions(path=data, batch_size=4),
                              output_aware=False, correct=step == "correct")
    run = RunOptions(stream=step != "memory", device=None if device == "auto" else device)
    opts = CompressOptions(policy=RankPolicy(keep=0.5), run=run, method=aware,
                           export=ExportOptions(overwrite=True))
    summary = compress_checkpoint(src, out, opts).report
    if "correction" in summary:  # which layers the error correction refit
        done = summary["correction"]
        print(json.dumps({"refit": len(done["refit"]),
                          "of": len(done["refit"]) + len(done["skipped"])}))
elif step == "reload":
    from compressor.io.load import load_pretrained
    load_pretrained(out)
elif step == "ops":  # one layer of each shape: the old decomposition vs the streamed one
    import torch
    from compressor.core import linalg
    from compressor.core.gram import (gram_factors, gram_singular_values, randomized_factors,
                                      use_randomized)
    res = {}
    for shape in ((4096, 4096), (11008, 4096)):
        w = torch.randn(*shape).to(torch.bfloat16)
        rank = {4096: 1024, 11008: 1408}[shape[0]]  # about what keep 0.5 allocates
        c = time.perf_counter()
        d = linalg.decompose(w, linalg.floor_breakeven(*shape))
        linalg.factors_from(w, d, rank)
        old = time.perf_counter() - c
        c = time.perf_counter()
        s = gram_singular_values(w)
        randomized = use_randomized(shape, rank)  # as the streamed solver "auto" picks
        fast = randomized_factors if randomized else gram_factors
        up, down, top = fast(w, rank)
        new = time.perf_counter() - c
        excess = (float(w.double().square().sum()) - float(top.double().square().sum())) ** 0.5
        res[str(shape)] = [old, new, excess / linalg.truncation_error(s, rank) - 1]
    print(json.dumps(res))
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": u.ru_utime + u.ru_stime,
                  "peak": u.ru_maxrss * 1024}))
"""


def build(folder: Path, layers: int, hidden: int, intermediate: int) -> None:
    """The slice, written by a child process (its memory is not counted anywhere)."""
    code = (
        "import sys, torch, transformers as tf; torch.manual_seed(0);"
        "h, i = int(sys.argv[3]), int(sys.argv[4]);"
        "cfg = tf.LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=h // 128,"
        " num_key_value_heads=h // 128, num_hidden_layers=int(sys.argv[2]), vocab_size=32000,"
        " dtype='bfloat16');"
        "torch.set_default_dtype(torch.bfloat16);"
        "m = tf.LlamaForCausalLM(cfg); m.save_pretrained(sys.argv[1], max_shard_size='1GB')"
    )
    args = [str(folder), str(layers), str(hidden), str(intermediate)]
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)


def run(step: str, src: Path, out: Path, device: str, data: Path | None = None) -> dict:
    import json

    done = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(src), str(out), device, str(data)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    if step == "correct":
        result.update(json.loads(lines[-2]))
    if step == "ops":
        result["ops"] = json.loads(lines[-2])
    return result


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--steps",
        nargs="+",
        default=["stream", "reload"],
        help="stream, whiten (streamed, no correction), correct (streamed whiten with error "
        "correction), memory (the in-memory path; slow), reload",
    )
    parser.add_argument(
        "--samples", type=int, default=16, help="calibration samples of 128 tokens (whiten)"
    )
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument(
        "--ops", action="store_true", help="time one layer's decomposition, old vs new"
    )
    parser.add_argument("--device", default="auto", help="linear algebra device (auto: GPU if any)")
    args = parser.parse_args()
    largest = args.hidden * args.intermediate * 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlnc-scale-") as tmp:
        data = Path(tmp) / "ids.safetensors"
        _calibration_ids(data, args.samples)
        if args.ops:
            ops = run("ops", Path(tmp), Path(tmp), args.device)["ops"]
            print(
                "| layer | old: decompose + factors, wall s | new: Gram spectrum + auto factors, "
                "wall s | ratio | new error / optimum - 1 |"
            )
            print("|---|---|---|---|---|")
            for shape, (old, new, excess) in ops.items():
                print(f"| {shape} | {old:.0f} | {new:.0f} | {old / new:.1f}x | {excess:.4f} |")
        for layers in args.layers:
            src, out = Path(tmp) / f"slice-{layers}", Path(tmp) / f"slice-{layers}-dlnc"
            t = time.perf_counter()
            build(src, layers, args.hidden, args.intermediate)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            print(
                f"built {layers} layers ({gb(size)}) in {time.perf_counter() - t:.0f} s", flush=True
            )
            base = run("baseline", src, out, args.device)
            rows.append((layers, "baseline", base))
            for step in args.steps:
                rows.append((layers, step, run(step, src, out, args.device, data)))
                print(rows[-1], flush=True)
    _table(rows, largest, args)


def _calibration_ids(path: Path, samples: int) -> None:
    import torch
    from safetensors.torch import save_file

    ids = torch.randint(100, 32000, (samples, 128), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, path)


def _table(rows, largest: int, args) -> None:
    """Per layer: the wall-time difference between the smallest and largest slice, divided by
    the layers added (fixed costs such as the embedding's copy cancel); with one slice,
    (wall - baseline wall) / layers."""
    print(
        f"\nshape: hidden {args.hidden}, intermediate {args.intermediate}; "
        f"largest layer {gb(largest)} (bf16)"
    )
    print(
        "| layers | step | wall s | CPU s | wall s / layer | 32 layers | peak RSS "
        "| peak - baseline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for layers, step, r in rows:
        base = next(b for n, s, b in rows if n == layers and s == "baseline")
        extra = r["peak"] - base["peak"]
        per_s = proj = ""
        if step not in ("baseline", "reload"):
            same = sorted((n, x["seconds"]) for n, s, x in rows if s == step)
            (n0, t0), (n1, t1) = same[0], same[-1]
            per = (t1 - t0) / (n1 - n0) if n1 > n0 else (t0 - base["seconds"]) / n0
            per_s, proj = f"{per:.1f}", f"{(t0 + (32 - n0) * per) / 60:.0f} min"
        if "refit" in r:
            step = f"{step} (refit {r['refit']} of {r['of']})"
        print(
            f"| {layers} | {step} | {r['seconds']:.0f} | {r['cpu']:.0f} | {per_s} | {proj} "
            f"| {gb(r['peak'])} | {gb(extra)} ({extra / largest:.1f}x largest layer) |"
        )


if __name__ == "__main__":
    main()
