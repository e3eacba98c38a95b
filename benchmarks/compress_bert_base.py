"""Benchmark (issue 2): compress a BERT-base-sized model at --keep 0.5 and measure it.

Prints a table: compression wall time and peak memory (of a fresh process that only
compresses), bytes on disk before/after, and CPU forward latency at batch 8 x 128 tokens of
the exported model vs the original. Random weights are fine for timing.

    python benchmarks/compress_bert_base.py [--keep 0.5] [--layers 12] [--repeats 10]
                                            [--data-batches 8]

With --data-batches N it also times the data-aware compression (whiten, N batches of 8 x 128
random token ids as calibration data) with issue 11's output-aware allocation, the default,
against the same without it (`--no-output-aware`, the allocation before issue 11).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build(folder: Path, layers: int) -> int:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def compress_in_child(
    src: Path, out: Path, keep: float, data: Path | None = None, output_aware: bool = True
) -> tuple[float, float]:
    """Run the compression in a fresh process; returns (seconds, peak RSS in bytes)."""
    aware = "None"
    if data is not None:
        aware = (
            f"MethodOptions(method='whiten', data=DataOptions(path={str(data)!r}, batch_size=8),"
            f" output_aware={output_aware})"
        )
    code = (
        "import sys, time;"
        "from compressor.workflows.compress import compress_checkpoint;"
        "from compressor.options import CompressOptions, ExportOptions, MethodOptions;"
        "from compressor.training.data import DataOptions;"
        "from compressor.core.ranks import RankPolicy; t = time.perf_counter();"
        f"opts = CompressOptions(policy=RankPolicy(keep={keep}), method={aware},"
        " export=ExportOptions(overwrite=True));"
        "compress_checkpoint(sys.argv[1], sys.argv[2], opts);"
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, check=True
    )
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return float(done.stdout.strip().splitlines()[-1]), peak_kb * 1024


def latency(model, repeats: int) -> float:
    import torch

    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step(model, repeats: int = 3) -> float:
    """Fastest of `repeats` training steps (forward, MSE on the hidden states, backward,
    AdamW update) at batch 8 x 128, after one untimed step."""
    import torch

    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(1))
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        model(input_ids=ids).last_hidden_state.square().mean().backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--data-batches", type=int, default=0, help="also time whiten with data")
    args = parser.parse_args()

    from transformers import BertModel

    from compressor.io.export import disk_size
    from compressor.io.load import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "bert-base", Path(tmp) / "bert-base-dlnc"
        params = build(src, args.layers)
        model_bytes = disk_size(src / "model.safetensors")
        seconds, peak = compress_in_child(src, out, args.keep)
        after_bytes = disk_size(sorted(out.glob("*.safetensors")))
        original = BertModel.from_pretrained(src).eval()
        compressed = load_pretrained(out)
        t_orig, t_comp = latency(original, args.repeats), latency(compressed, args.repeats)
        s_orig, s_comp = train_step(original), train_step(compressed)
        aware = {}
        if args.data_batches:
            import torch
            from safetensors.torch import save_file

            ids = Path(tmp) / "ids.safetensors"
            gen = torch.Generator().manual_seed(0)
            save_file({"input_ids": torch.randint(1000, 20000, (8 * args.data_batches, 128),
                                                  generator=gen)}, ids)  # fmt: skip
            for flag in (False, True):
                aware[flag] = compress_in_child(src, out, args.keep, ids, output_aware=flag)[0]

    # targets on 2 CPU cores: time < 60 s, peak < 3x the model, latency <= 0.8x
    rows = [
        ("model", f"BERT-base config, {args.layers} layers, {params / 1e6:.1f}M params, fp32"),
        ("keep (targeted weights)", f"{args.keep}"),
        ("compression wall time", f"{seconds:.1f} s"),
        (
            "peak memory (compress process)",
            f"{peak / 1e9:.2f} GB = {peak / model_bytes:.2f}x model (target < 3x)",
        ),
        ("bytes on disk before", f"{model_bytes / 1e6:.1f} MB"),
        ("bytes on disk after", f"{after_bytes / 1e6:.1f} MB ({after_bytes / model_bytes:.2f}x)"),
        ("latency original, 8x128", f"{t_orig * 1e3:.0f} ms"),
        (
            "latency compressed, 8x128",
            f"{t_comp * 1e3:.0f} ms = {t_comp / t_orig:.2f}x (target <= 0.8x)",
        ),
        ("training step original, 8x128", f"{s_orig * 1e3:.0f} ms"),
        ("training step compressed, 8x128", f"{s_comp * 1e3:.0f} ms = {s_comp / s_orig:.2f}x"),
        ("torch threads", f"{__import__('torch').get_num_threads()}"),
    ]
    if aware:
        rows += [
            ("with data: whiten, before issue 11", f"{aware[False]:.1f} s"),
            (
                "with data: whiten + output-aware (default)",
                f"{aware[True]:.1f} s = {aware[True] / aware[False]:.2f}x (target <= 2x)",
            ),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
