"""The LM head as a compression target (issue 27): on SmolLM2-135M-Instruct its 49152 x 576
weight (tied to the embedding) is a fifth of the model and the largest matmul of every decoded
token. Does factorizing it pay in speed, and at what cost in quality?

The head is truncated by whitened SVD on the calibration windows' final hidden states (its
input Gram: the factors minimising ||(W - W') L||_F, dlnc's `whiten` without the output
sensitivity, which for the head is the loss itself), untied from the embedding, at each of
`--ranks`; the decoder layers stay dense. Held-out perplexity (benchmarks/smollm2.py's text and
windows) and `dlnc speed`'s prefill / decode timings, all models taking turns in one process.

    python benchmarks/lm_head.py [--ranks 384 256 128] [--heldout 20] [--calib 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2 import (
    CACHE,
    WINDOW,
    float32_folder,
    perplexity,
    speed_row,
    spread,
    text_id,
    windows,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", nargs="+", type=int, default=[384, 256, 128])
    p.add_argument("--heldout", type=int, default=20)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=CACHE)
    return p.parse_args(argv)


def head_gram(model, calib: torch.Tensor) -> torch.Tensor:
    """The Gram matrix (mean of x x^T) of the LM head's inputs on the calibration windows."""
    from compressor.methods.calibration import collect_grams

    batches = [{"input_ids": b} for b in calib.split(4)]
    stats = collect_grams(model, {"lm_head": model.get_output_embeddings()}, batches)["lm_head"]
    return stats.gram / stats.rows


def factorized_head(model, gram: torch.Tensor, rank: int):
    """`model` with its LM head replaced by the rank-`rank` whitened truncation (untied)."""
    from compressor.core.layers import FactorizedLinear
    from compressor.core.whitening import Whitener, whitened_factors

    head = model.get_output_embeddings()
    w = head.weight.detach().double()
    up, down, _, rel = whitened_factors(w, Whitener.from_gram(gram.float(), 0.01), rank)
    layer = FactorizedLinear(w.shape[1], w.shape[0], rank, bias=False)
    with torch.no_grad():
        layer.load_factors(up.float(), down.float())
    model.lm_head = layer
    model.config.tie_word_embeddings = False
    return model, rel


def main(argv: list[str] | None = None) -> None:
    from data_aware import prose_corpus

    from compressor.training.data import load_tokenizer
    from compressor.workflows.finetune import load_model
    from compressor.workflows.speed import SpeedOptions, measure_models

    args = parse(argv)
    torch.set_num_threads(args.threads)
    f32 = float32_folder(args.cache)
    tok = load_tokenizer(f32)
    _, calib_text, held_text = prose_corpus()
    held = spread(windows(tok, held_text, WINDOW), args.heldout)
    calib = spread(windows(tok, calib_text, WINDOW), args.calib)
    dense = load_model(f32).eval()
    gram = head_gram(dense, calib)
    models, rows = {"dense": dense}, {"dense": ("49152 x 576", 1.0)}
    shape = dense.get_output_embeddings().weight.shape
    for rank in args.ranks:
        model, rel = factorized_head(load_model(f32).eval(), gram, rank)
        label = f"head rank {rank}"
        models[label] = model
        rows[label] = (f"rel. error {rel:.3f}", rank * sum(shape) / shape.numel())
    ppl = {label: perplexity(m, held) for label, m in models.items()}
    speed = measure_models(models, SpeedOptions(prompt_len=256, threads=args.threads))
    base = speed["dense"]
    print(f"\nSmolLM2-135M float32, {args.threads} threads; held-out {args.heldout} x "
          f"{WINDOW} tokens (ids {text_id(held)}); prefill 1 x 256; decode 32 tokens after "
          "32\n")  # fmt: skip
    print("| LM head | whitened | head params | held-out ppl | prefill ms | decode b1 tok/s "
          "| decode b8 tok/s |\n|---|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for label, s in speed.items():
        what, share = rows[label]
        print(speed_row(f"{label} | {what} | {share:.2f}", ppl[label], s, base))


if __name__ == "__main__":
    main()
