"""Integer matmul kernels on this machine's CPU against float32 (issue 27: can an int8 or int4
factor run faster than the float one, instead of dequantizing its weight for every matmul?).

Part 1, one layer (SmolLM2's shapes, 1 and 8 rows, best-of timing per call): float32 `linear`;
torch's weight-only int8 (`aten._weight_int8pack_mm`) and int4
(`aten._weight_int4pack_mm_for_cpu`, groups of 64) kernels, on float32 inputs and on bfloat16
inputs (what dlnc's `QuantLinear` runs at a few rows, compressor/core/intmm.py); int8 x int8 with
dynamically quantized activations (`torch._int_mm`, a scale per row); fbgemm's dynamic int8
linear (`torch.ops.quantized.linear_dynamic`: activations quantized per tensor on the fly, int8
weights a scale per row); and, when `torchao` is installed, its eager `Int8WeightOnlyConfig` and
`Int8DynamicActivationInt8WeightConfig`. What the numbers of a kernel mean depends on the CPU's
instruction set (printed).

Part 2, the models (`--models`, dlnc int8/int4 exports): held-out perplexity, prefill and
decode tokens/s of the dense float32 model and of each export as dlnc loads it (integer
kernels on bfloat16 inputs up to `intmm.ROWS` rows: decode; dequantized: prefill) and with
every matmul dequantized (the path before session 19), timed in turns in one process. The
first perplexity runs every matmul of the windows through the kernels (`intmm.ROWS` raised),
the second every one dequantized: the kernels' cost in quality. `--fbgemm` adds session 15's
rows: the dense model's decoder linears and the int8 export's layers run by fbgemm's dynamic
kernel (activations quantized a tensor at a time).

    python benchmarks/int_kernels.py [--threads 2] [--dense F32] [--models EXPORT ...]
        [--heldout 10] [--fbgemm] [--skip-model]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = ((576, 576), (1536, 576), (576, 1536))  # SmolLM2 q/o, gate/up, down (out, in)
ROWS = (1, 8)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense", type=Path, default=Path("/tmp/dlnc-smollm2/f32"))
    quant = Path("/tmp/dlnc-smollm2/quant")
    p.add_argument(
        "--models", type=Path, nargs="*", default=[quant / "k0.8-int8", quant / "k0.8-int4"]
    )
    p.add_argument("--fbgemm", action="store_true", help="session 15's fbgemm W8A8 rows too")
    p.add_argument("--heldout", type=int, default=10)
    p.add_argument("--skip-model", action="store_true", help="part 1 only")
    return p.parse_args(argv)


def per_call_us(fn, calls: int = 200) -> float:
    """Microseconds a call, the best of 3 rounds of `calls` after a warm-up."""
    with torch.no_grad():
        for _ in range(10):
            fn()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def fbgemm_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias=None):
    """fbgemm's packed weight of an int8 weight w = (codes - zeros) * scales (a row each)."""
    wq = torch._make_per_channel_quantized_tensor(
        (codes.int() - 128).to(torch.int8), scales.double(), zeros.long() - 128, 0
    )
    return torch.ops.quantized.linear_prepack(wq, bias)


def layer_kernels(out_f: int, in_f: int, rows: int) -> dict[str, float | str]:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, in_f, generator=g), torch.randn(out_f, in_f, generator=g) * 0.05
    codes8 = torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = torch.rand(out_f, generator=g) * 1e-3
    times: dict[str, float | str] = {"float32": per_call_us(lambda: nn.functional.linear(x, w))}

    def attempt(name, make):
        try:
            times[name] = per_call_us(make())
        except Exception as e:  # a kernel this build or CPU lacks
            times[name] = f"n/a ({type(e).__name__})"

    xb = x.bfloat16()
    int8 = torch.ops.aten._weight_int8pack_mm
    attempt("aten int8 weight-only", lambda: lambda: int8(x, codes8, scale))
    attempt(
        "aten int8 weight-only, bf16 inputs", lambda: lambda: int8(xb, codes8, scale.bfloat16())
    )

    def int4(inputs):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32), 1
        )
        pairs = torch.rand(in_f // 64, out_f, 2, generator=g).to(inputs.dtype)
        return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(inputs, packed, 64, pairs)

    attempt("aten int4 weight-only g64", lambda: int4(x))
    attempt("aten int4 weight-only g64, bf16 inputs", lambda: int4(xb))

    def w8a8():
        wt = codes8.t()

        def run():
            s = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
            return torch._int_mm((x / s).round().to(torch.int8), wt) * s * scale

        return run

    attempt("_int_mm, int8 activations", w8a8)

    def fbgemm():
        packed = fbgemm_linear(codes8.view(torch.uint8) ^ 0x80, scale, torch.full((out_f,), 128))
        return lambda: torch.ops.quantized.linear_dynamic(x, packed, True)

    attempt("fbgemm dynamic int8", fbgemm)
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        return times
    configs = {
        "torchao int8 weight-only": Int8WeightOnlyConfig(),
        "torchao int8 dynamic": Int8DynamicActivationInt8WeightConfig(),
    }
    for name, config in configs.items():
        layer = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
        layer[0].weight.data = w.clone()

        def make(layer=layer, config=config):
            quantize_(layer, config)
            return lambda: layer(x)

        attempt(name, make)
    return times


class FbgemmInt8(nn.Module):
    """A stored int8 `QuantLinear` run by fbgemm's dynamic kernel (activations quantized)."""

    def __init__(self, layer) -> None:
        super().__init__()
        q = layer.quantized()
        self.packed = fbgemm_linear(q.qweight, q.scales[:, 0], q.zeros[:, 0], layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


def with_fbgemm(model: nn.Module) -> nn.Module:
    from compressor.core.layers import QuantLinear

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantLinear) and child.spec.bits == 8 and child.spec.group == 0:
                setattr(parent, name, FbgemmInt8(child))
    return model


def dense_fbgemm(model: nn.Module) -> nn.Module:
    """Every decoder linear of the dense model rounded to int8 (a scale a row) by dlnc's
    `quantize_model`, then run by fbgemm's dynamic kernel."""
    from smollm2 import decoder_linears

    from compressor.core.quantize import QuantSpec
    from compressor.workflows.quantize import quantize_model

    model = copy.deepcopy(model)
    quantize_model(model, list(decoder_linears(model)), QuantSpec(8, 0))
    return with_fbgemm(model)


def dequantizing(model: nn.Module) -> nn.Module:
    """A copy of `model` whose quantized layers dequantize for every matmul (no kernels)."""
    from compressor.core.layers import QuantLinear

    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            layer._packed = lambda: None  # (the instance's: no kernel layout)
    return model


def models_part(args: argparse.Namespace) -> None:
    from data_aware import prose_corpus
    from smollm2 import WINDOW, perplexity, speed_row, spread, text_id, windows

    from compressor.core import intmm
    from compressor.io.load import load_pretrained
    from compressor.training.data import load_tokenizer
    from compressor.workflows.finetune import load_model
    from compressor.workflows.speed import SpeedOptions, measure_models

    tok = load_tokenizer(args.dense)
    _, _, held_text = prose_corpus()
    held = spread(windows(tok, held_text, WINDOW), args.heldout)
    dense = load_model(args.dense).eval()
    models, ppl = {"dense float32": dense}, {}
    if args.fbgemm:
        models["dense, decoder linears fbgemm W8A8"] = dense_fbgemm(dense)
    with torch.no_grad():
        ppl = {label: perplexity(m, held) for label, m in models.items()}
        for path in args.models:
            export = load_pretrained(path).eval()
            kernels, plain = (
                f"{path.name} (dlnc: kernels at decode)",
                f"{path.name} (dequantize every matmul)",
            )
            models[kernels], models[plain] = export, dequantizing(export)
            rows, intmm.ROWS = intmm.ROWS, 10**9  # every matmul of the windows through the kernels
            ppl[kernels] = perplexity(export, held)
            intmm.ROWS = rows
            ppl[plain] = perplexity(models[plain], held)
            if args.fbgemm:
                models[f"{path.name}, int8 layers fbgemm W8A8"] = with_fbgemm(models[plain])
                ppl[f"{path.name}, int8 layers fbgemm W8A8"] = perplexity(
                    models[f"{path.name}, int8 layers fbgemm W8A8"], held
                )
    speed = measure_models(models, SpeedOptions(prompt_len=256, threads=args.threads))
    base = speed["dense float32"]
    print(
        f"\n{args.heldout} x {WINDOW} held-out tokens (ids {text_id(held)}); prefill 1 x 256, "
        f"decode 32 tokens; kernels up to {intmm.ROWS} rows\n"
    )
    print("| model | held-out ppl | prefill ms | decode b1 tok/s | decode b8 tok/s |")
    print("|---|---:|---:|---:|---:|")
    for label, s in speed.items():
        print(speed_row(label, ppl[label], s, base))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; microseconds a call\n")  # fmt: skip
    rows = [(o, i, r, layer_kernels(o, i, r)) for o, i in SHAPES for r in ROWS]
    names = list(rows[0][3])
    print("| out x in | rows | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for o, i, r, t in rows:
        cells = [f"{t[n]:.0f}" if isinstance(t[n], float) else t[n] for n in names]
        print(f"| {o} x {i} | {r} | " + " | ".join(cells) + " |")
    if not args.skip_model:
        models_part(args)


if __name__ == "__main__":
    main()
