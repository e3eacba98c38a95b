"""Benchmark (issue 27): does a compressed causal LM generate faster than its dense original?

Rows: dense, keep 0.8 and keep 0.5, each with the plain plan (`--speed smallest`) and the
speed-aware one (`--speed never-slower`: a layer whose factorized form is slower than dense at
1, 8 or 256 rows on this device stays dense, from the kernel timings dlnc caches), each plain
and, with --compile, under `torch.compile`. Columns: prefill ms (1 x --prompt-len)
and decode tokens/s in `generate` (KV cache, greedy, --new-tokens per sequence) at batch 1
and 8, and each model's speed-up over dense. All models of one family are timed in one
process, taking turns in every repeat (`compressor.workflows.speed.measure_models`), best of
--repeats after a warm-up.

Families:
  smollm2  data-free exports of /tmp/dlnc-smollm2/f32 (`dlnc compress DENSE --keep K
           --speed S`), made into --exports/kK-S where missing
  llama1b  a Llama with a 1B model's layer shapes (hidden 2048, MLP 8192, 32 heads, 8 k/v
           heads) and random weights (speed needs no real weights), --layers of them,
           factorized data-free at uniform ranks (random factors: the shapes are what count)

    python benchmarks/speed_lm.py [--family smollm2 llama1b] [--device cpu|cuda]
        [--threads 2] [--repeats 3] [--prompt-len 512] [--new-tokens 32] [--compile]
        [--keeps 0.8 0.5] [--speeds smallest never-slower]

The GPU path is the same script with --device cuda (and --dtype bfloat16); it has not been
run on a GPU yet.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from compressor.core.layers import FactorizedLinear
from compressor.core.ranks import SPEEDS, RankPolicy, allocate_ranks
from compressor.core.surgery import replace_module
from compressor.core.targets import find_targets
from compressor.workflows.speed import DTYPES, GRAPHS_PER_MODEL, SpeedOptions, measure_models
from compressor.workflows.speedplan import speed_policy

KEEPS = (0.8, 0.5)


def smollm2(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Dense and its data-free exports at each keep, plain and never-slower, made here by
    `compress_checkpoint` where --exports does not hold them yet."""
    from compressor.core.ranks import RankPolicy
    from compressor.options import CompressOptions
    from compressor.workflows.compress import compress_checkpoint
    from compressor.workflows.finetune import load_model

    models = {"dense": load_model(args.dense)}
    for keep, speed in itertools.product(args.keeps, args.speeds):
        folder = Path(args.exports) / f"k{keep}-{speed}"
        if not (folder / "config.json").exists():
            policy = RankPolicy(keep=keep, speed=speed)
            compress_checkpoint(args.dense, folder, CompressOptions(policy=policy))
        report = json.loads((folder / "report.json").read_text())
        dense = sum(layer["rank"] is None for layer in report["layers"])
        models[_label(keep, speed, dense)] = load_model(folder)
    return models


def _label(keep: float, speed: str, dense: int) -> str:
    return f"keep {keep}" + (f" {speed} ({dense} dense)" if speed != "smallest" else "")


def llama1b(args: argparse.Namespace) -> dict[str, nn.Module]:
    """A Llama of a 1B model's shapes, random weights, factorized by the library's allocation
    over flat spectra (the same fraction everywhere, as far as the caps allow)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    models = {"dense": LlamaForCausalLM(config).eval()}
    for keep, speed in itertools.product(args.keeps, args.speeds):
        model = LlamaForCausalLM(config).eval()
        targets = find_targets(model)
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
        flat = {n: torch.ones(min(s)) for n, s in shapes.items()}
        policy = speed_policy(RankPolicy(keep=keep, speed=speed), shapes, args.device,
                              DTYPES[args.dtype])  # fmt: skip
        dense = 0
        for name, decision in allocate_ranks(flat, shapes, policy).items():
            if decision.dense:
                dense += 1
                continue
            out_f, in_f = shapes[name]
            layer = FactorizedLinear(
                in_f, out_f, decision.rank, bias=targets[name].bias is not None
            )
            replace_module(model, name, layer)
        models[_label(keep, speed, dense)] = model
    return models


def variants(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, nn.Module]:
    """The models on the device in the dtype and, with --compile, each compiled too."""
    out = {label: model.to(args.device, DTYPES[args.dtype]) for label, model in models.items()}
    if args.compile:
        # room for every model's graphs under their shared code object (as `dlnc speed
        # --compile` makes it: workflows/speed.py), for all the copies compiled here
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, GRAPHS_PER_MODEL * 2 * len(out))
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
    parser.add_argument("--exports", default="/tmp/speed", help="folder of the exports")
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
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    parser.add_argument("--speeds", nargs="+", default=list(SPEEDS), choices=SPEEDS)
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
