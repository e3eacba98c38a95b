"""Benchmark (issue 27): does a compressed causal LM generate faster than its dense original?

Rows: dense, keep 0.8 and keep 0.5, plain and "never slower" (each factorized layer timed
against its dense form at 1 and 8 rows, the decode shapes, and kept dense where it loses),
each plain and, with --compile, under `torch.compile`. Columns: prefill ms (1 x --prompt-len)
and decode tokens/s in `generate` (KV cache, greedy, --new-tokens per sequence) at batch 1
and 8, and each model's speed-up over dense. All models of one family are timed in one
process, taking turns in every repeat (`compressor.workflows.speed.measure_models`), best of
--repeats after a warm-up.

Families:
  smollm2  the exports of /tmp/dlnc-smollm2/f32 made by
           `dlnc compress /tmp/dlnc-smollm2/f32 --keep K --out /tmp/speed/kK` (--exports)
  llama1b  a Llama with a 1B model's layer shapes (hidden 2048, MLP 8192, 32 heads, 8 k/v
           heads) and random weights (speed needs no real weights), --layers of them,
           factorized data-free at uniform ranks (random factors: the shapes are what count)

    python benchmarks/speed_lm.py [--family smollm2 llama1b] [--device cpu|cuda]
        [--threads 2] [--repeats 3] [--prompt-len 512] [--new-tokens 32] [--compile]

The GPU path is the same script with --device cuda (and --dtype bfloat16); it has not been
run on a GPU yet.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from compressor.core.allocate import uniform_ranks
from compressor.core.layers import FactorizedLinear
from compressor.core.surgery import factorized_layers, replace_module
from compressor.core.targets import find_targets
from compressor.workflows.speed import DTYPES, SpeedOptions, measure_models

KEEPS = (0.8, 0.5)


def smollm2(args: argparse.Namespace) -> dict[str, nn.Module]:
    from compressor.workflows.finetune import load_model

    models = {"dense": load_model(args.dense)}
    for keep in KEEPS:
        models[f"keep {keep}"] = load_model(Path(args.exports) / f"k{keep}")
    return models


def llama1b(args: argparse.Namespace) -> dict[str, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    models = {"dense": LlamaForCausalLM(config).eval()}
    for keep in KEEPS:
        model = LlamaForCausalLM(config).eval()
        targets = find_targets(model)
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
        for name, rank in uniform_ranks(shapes, keep).items():
            out_f, in_f = shapes[name]
            layer = FactorizedLinear(in_f, out_f, rank, bias=targets[name].bias is not None)
            replace_module(model, name, layer)
        models[f"keep {keep}"] = model
    return models


@torch.inference_mode()
def never_slower(model: nn.Module, device: str, rows: tuple[int, ...] = (1, 8)) -> int:
    """Swap back to dense each factorized layer slower than its dense form at any of `rows`
    (best of 3 of 5 calls); the number swapped."""
    swapped = 0
    for name, layer in factorized_layers(model).items():
        dense = layer.to_dense()
        slower = False
        for m in rows:
            x = torch.randn(m, layer.in_features, dtype=layer.up.weight.dtype, device=device)
            slower |= _best(layer, x) > _best(dense, x)
        if slower:
            replace_module(model, name, dense)
            swapped += 1
    return swapped


def _best(layer: nn.Module, x: torch.Tensor, calls: int = 5) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            layer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def variants(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, nn.Module]:
    """The plain models, their never-slower forms and (--compile) each compiled."""
    dtype = DTYPES[args.dtype]
    out = {}
    for label, model in models.items():
        out[label] = model.to(args.device, dtype)
        if label != "dense":
            import copy

            safe = copy.deepcopy(out[label])
            swapped = never_slower(safe, args.device)
            out[f"{label} never-slower ({swapped} dense)"] = safe
    if args.compile:
        import copy

        for label in list(out):
            compiled = copy.deepcopy(out[label])
            compiled.forward = torch.compile(compiled.forward, dynamic=True)
            out[f"{label} compiled"] = compiled
    return out


def table(family: str, rows: dict, args: argparse.Namespace) -> str:
    d = rows["dense"]
    head = (f"| {family} ({args.device}, {args.dtype}, {args.threads} threads) | params | "
            f"prefill 1x{args.prompt_len} ms | decode b1 tok/s | decode b8 tok/s |")  # fmt: skip
    lines = [head, "|---|---:|---:|---:|---:|"]
    for label, r in rows.items():
        tps = r.decode_tokens_per_s
        lines.append(
            f"| {label} | {r.params / 1e6:.1f}M | {r.prefill_ms:.0f} "
            f"({d.prefill_ms / r.prefill_ms:.2f}x) | {tps[1]:.1f} "
            f"({tps[1] / d.decode_tokens_per_s[1]:.2f}x) | {tps[8]:.1f} "
            f"({tps[8] / d.decode_tokens_per_s[8]:.2f}x) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["smollm2", "llama1b"])
    parser.add_argument("--dense", default="/tmp/dlnc-smollm2/f32")
    parser.add_argument("--exports", default="/tmp/speed", help="folder of k0.8/ and k0.5/")
    parser.add_argument("--layers", type=int, default=16, help="llama1b: decoder layers")
    parser.add_argument("--vocab", type=int, default=128256, help="llama1b: vocabulary")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--context-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = SpeedOptions(
        prefill_batch=1, prompt_len=args.prompt_len, decode_batches=(1, 8),
        context_len=args.context_len, new_tokens=args.new_tokens, repeats=args.repeats,
        device=args.device, dtype=args.dtype, threads=args.threads,
    )  # fmt: skip
    builders = {"smollm2": smollm2, "llama1b": llama1b}
    for family in args.family:
        models = variants(builders[family](args), args)
        rows = measure_models(models, options)
        print(table(family, rows, args), flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
