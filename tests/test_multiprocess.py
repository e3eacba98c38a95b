"""Two real processes (gloo on CPU, launched by torchrun) train one model and export it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from compressor.io.load import load_pretrained

SCRIPT = Path(__file__).parent / "scripts" / "finetune_ddp.py"


def test_two_processes_train_and_export_one_model(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(SCRIPT), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert [r["is_main"] for r in ranks] == [True, False]
    assert ranks[0]["first_inputs"] != ranks[1]["first_inputs"]  # each rank its own shard
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas equal
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the global mean
    assert ranks[0]["eval_samples"] == 12  # 3 held-out batches of 4, gathered once each
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["export", "state"]
    saved = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert saved == ["checkpoint-0000002", "checkpoint-0000004"]  # complete, no temp folders
    assert sorted(p.name for p in (tmp_path / "state" / "checkpoint-0000004").iterdir()) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl",
        "scheduler.bin", "trainer_state.json",
    ]  # fmt: skip
    reloaded = load_pretrained(tmp_path / "export")
    batch = {
        "input_ids": torch.randint(1, 64, (4, 16), generator=torch.Generator().manual_seed(1)),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
    }
    with torch.no_grad():
        logits = reloaded(**batch).logits
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt"))
