"""Benchmark (issue 12): compress and reload a Llama-7B-shaped slice without holding the model.

Writes a Llama-7B-shaped checkpoint (hidden 4096, intermediate 11008, 32 heads, no GQA, vocab
32000, random bf16 weights, 1 GB shards) with `--layers` decoder layers to a temp folder, then
runs each step in a fresh process and reads that process's own peak RSS (ru_maxrss):
  baseline   imports + the meta-device model tree: the fixed overhead
  stream     data-free --keep 0.5 on every projection, streamed (the default path now)
  memory     the same through the in-memory path (--memory; slow: one full SVD per layer)
  reload     load_pretrained of the export
Prints a table; per-layer time is (time - baseline time) / layers, projected to 32 layers.

    python benchmarks/scale.py --layers 2 4 [--memory] [--device cuda]
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
step, src, out, device = sys.argv[1:5]
if step == "baseline":
    from compressor.io.streaming import meta_model
    import compressor.workflows.stream, transformers
    cfg = transformers.AutoConfig.from_pretrained(src)
    meta_model(transformers.LlamaForCausalLM, cfg)
elif step in ("stream", "memory"):
    from compressor.core.ranks import RankPolicy
    from compressor.workflows.compress import CompressOptions, compress_checkpoint
    opts = CompressOptions(policy=RankPolicy(keep=0.5), stream=step == "stream",
                           device=None if device == "auto" else device, overwrite=True)
    compress_checkpoint(src, out, opts)
elif step == "reload":
    from compressor.io.export import load_pretrained
    load_pretrained(out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": time.perf_counter() - t, "peak": peak}))
"""


def build(folder: Path, layers: int) -> None:
    """The slice, written by a child process (its memory is not counted anywhere)."""
    code = (
        "import sys, torch, transformers as tf; torch.manual_seed(0);"
        "cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,"
        " num_key_value_heads=32, num_hidden_layers=int(sys.argv[2]), vocab_size=32000,"
        " dtype='bfloat16');"
        "torch.set_default_dtype(torch.bfloat16);"
        "m = tf.LlamaForCausalLM(cfg); m.save_pretrained(sys.argv[1], max_shard_size='1GB')"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(layers)], check=True)


def run(step: str, src: Path, out: Path, device: str) -> dict:
    import json

    done = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(src), str(out), device],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--memory", action="store_true", help="also time the in-memory path")
    parser.add_argument("--device", default="auto", help="linear algebra device (auto: GPU if any)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlnc-scale-") as tmp:
        for layers in args.layers:
            src, out = Path(tmp) / f"slice-{layers}", Path(tmp) / f"slice-{layers}-dlnc"
            t = time.perf_counter()
            build(src, layers)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            print(
                f"built {layers} layers ({gb(size)}) in {time.perf_counter() - t:.0f} s", flush=True
            )
            base = run("baseline", src, out, args.device)
            rows.append((layers, "baseline (imports + meta model)", base, None))
            steps = ["stream", "reload"] + (["memory"] if args.memory else [])
            for step in steps:
                result = run(step, src, out, args.device)
                per_layer = (result["seconds"] - base["seconds"]) / layers
                rows.append((layers, step, result, per_layer if step != "reload" else None))
                print(rows[-1], flush=True)
    print(f"\nlargest layer: {gb(LARGEST_LAYER_BYTES)} (bf16 {INTERMEDIATE}x{HIDDEN})")
    print("| layers | step | wall s | s / layer | 32 layers | peak RSS | peak - baseline |")
    print("|---|---|---|---|---|---|---|")
    for layers, step, r, per in rows:
        base = next(b for n, s, b, _ in rows if n == layers and s.startswith("baseline"))
        extra = r["peak"] - base["peak"]
        proj = f"{per * 32 / 60:.0f} min" if per else ""
        per_s = f"{per:.0f}" if per else ""
        print(
            f"| {layers} | {step} | {r['seconds']:.0f} | {per_s} | {proj} | {gb(r['peak'])} "
            f"| {gb(extra)} ({extra / LARGEST_LAYER_BYTES:.1f}x largest layer) |"
        )


if __name__ == "__main__":
    main()
