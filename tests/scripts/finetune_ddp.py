"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2`: fine-tune a tiny
compressed GPT-2 with DDP, export on the main process, and leave a record per rank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, helpers

from conftest import build_tiny
from finetune_helpers import compressed, token_batches

from compressor.io.export import export
from compressor.training.loop import FinetuneConfig, finetune


def main(out: Path) -> None:
    teacher = build_tiny("gpt2")  # seeded: the same on every rank
    student = compressed(teacher)
    seen: list[int] = []
    student.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int(kwargs["input_ids"].sum())), with_kwargs=True
    )
    batches = token_batches(6)
    config = FinetuneConfig(steps=4, lr=3e-3, save_every=2)
    result = finetune(student, batches, teacher=teacher, config=config,
                      eval_batches=batches[:3], state_dir=out / "state")  # fmt: skip
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    record = {
        "rank": rank,
        "world_size": world,
        "num_processes": result.num_processes,
        "is_main": result.is_main_process,
        "checksum": float(weights.double().sum()),
        "first_inputs": seen[0],
        "eval_samples": result.evals["after"].samples,
        "losses": result.losses,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if result.is_main_process:
        export(result.model, out / "export", config=result.model.config)
        with torch.no_grad():
            logits = result.model(**batches[0]).logits
        torch.save(logits, out / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
