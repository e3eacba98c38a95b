"""Benchmark (issue 13): dlnc exports in the Hugging Face ecosystem.

1) `from_pretrained` of a BERT-base export (random weights, compressed at --keep with
   `dlnc compress`'s defaults) against the dense original, each in a fresh process whose
   transformers modules are imported before the clock starts: the bare `from_pretrained` call
   (transformers memory-maps safetensors and reads no weight), the same plus reading every
   weight once (what loading a model costs), plus one forward pass; RSS growth over the bare
   call and peak RSS at the end.
2) Greedy generation (KV cache, batch 1) on CPU of a small Llama-shaped causal LM, dense vs
   compressed at --keep: new tokens per second.
Loads and generations alternate dense / compressed and the median of --repeats is reported.

    python benchmarks/hf_loading.py [--keep 0.5] [--repeats 3] [--threads 1] [--new-tokens 64]
                                    [--skip-generation] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LOAD_CHILD = """
import json, sys, time
import torch, transformers, compressor
import transformers.modeling_utils, transformers.quantizers.auto  # imported before the clock
import transformers.models.bert.modeling_bert
torch.set_num_threads({threads})
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
start = time.perf_counter()
model = transformers.AutoModel.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
loaded = status("VmRSS:")
with torch.no_grad():  # transformers maps the file and reads lazily: read every weight once
    for tensor in model.state_dict().values():
        tensor.sum()
read = time.perf_counter() - start
with torch.no_grad():
    model(input_ids=torch.ones(1, 128, dtype=torch.long))
ready = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "read": read, "ready": ready, "base": base,
                  "loaded": loaded, "peak": status("VmHWM:")}}))
"""


def compress(src: Path, out: Path, keep: float) -> None:
    from compressor.core.ranks import RankPolicy
    from compressor.options import CompressOptions
    from compressor.workflows.compress import compress_checkpoint

    compress_checkpoint(src, out, CompressOptions(policy=RankPolicy(keep=keep)))


def bert_base(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(folder)


def evict(folder: Path) -> None:
    """Drop the folder's weight files from the page cache (POSIX_FADV_DONTNEED): the next load
    reads them from the disk, as the first load after a download or a reboot does."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def load_in_child(folder: Path, threads: int, cold: bool = False) -> dict:
    if cold:
        evict(folder)
    code = LOAD_CHILD.format(threads=threads)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    return json.loads(run.stdout.strip().splitlines()[-1])


def small_llama(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)


def tokens_per_second(model, new_tokens: int) -> float:
    import torch

    prompt = torch.randint(5, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(prompt, use_cache=True, **settings)
    return new_tokens / (time.perf_counter() - start)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-generation", action="store_true", help="only the loads")
    parser.add_argument(
        "--cold", action="store_true", help="evict the weight files from the page cache first"
    )
    args = parser.parse_args()

    import torch

    import compressor  # noqa: F401 (registers the dlnc loader)
    from compressor.io.export import disk_size

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dlnc-hf-bench-") as tmp:
        root = Path(tmp)
        bert_base(root / "bert")
        compress(root / "bert", root / "bert-dlnc", args.keep)
        loads: dict[str, list[dict]] = {"dense": [], "dlnc": []}
        for _ in range(args.repeats):
            loads["dense"].append(load_in_child(root / "bert", args.threads, args.cold))
            loads["dlnc"].append(load_in_child(root / "bert-dlnc", args.threads, args.cold))

        if not args.skip_generation:
            speed, llama_sizes = generation(root, args)
        bert_sizes = disk_size(root / "bert"), disk_size(root / "bert-dlnc")

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in loads[name])

    grow = {n: med(n, "loaded") - med(n, "base") for n in loads}
    cache = "cold (evicted before each load)" if args.cold else "warm"
    print(
        f"keep {args.keep}, {args.threads} torch thread(s), median of {args.repeats}, "
        f"page cache {cache}\n"
    )
    header = "| dense | dlnc export | dlnc / dense |\n|---|---:|---:|---:|"
    print(f"| BERT-base, `AutoModel.from_pretrained` {header}")
    row("folder on disk", *bert_sizes, mib)
    secs = lambda v: f"{v:.3f} s"  # noqa: E731
    row("bare `from_pretrained` call", med("dense", "seconds"), med("dlnc", "seconds"), secs)
    row("load + read every weight once", med("dense", "read"), med("dlnc", "read"), secs)
    row("load, read + first forward (1 x 128)", med("dense", "ready"), med("dlnc", "ready"), secs)
    row("RSS growth over the bare call", grow["dense"], grow["dlnc"], mib)
    row("peak RSS after one forward (1 x 128)", med("dense", "peak"), med("dlnc", "peak"), mib)
    if args.skip_generation:
        return
    tps = {n: statistics.median(v) for n, v in speed.items()}
    print(f"\n| Llama-shaped LM, greedy, {args.new_tokens} new tokens {header}")
    row("folder on disk", *llama_sizes, mib)
    row("tokens / s (CPU, KV cache, batch 1)", tps["dense"], tps["dlnc"], lambda v: f"{v:.1f}")


def generation(root: Path, args) -> tuple[dict[str, list[float]], tuple[int, int]]:
    """Tokens per second of the dense and the compressed small Llama, alternating."""
    from transformers import AutoModelForCausalLM

    from compressor.io.export import disk_size

    small_llama(root / "llama")
    compress(root / "llama", root / "llama-dlnc", args.keep)
    models = {
        "dense": AutoModelForCausalLM.from_pretrained(root / "llama"),
        "dlnc": AutoModelForCausalLM.from_pretrained(root / "llama-dlnc"),
    }
    speed: dict[str, list[float]] = {"dense": [], "dlnc": []}
    for _ in range(args.repeats):
        for name, model in models.items():
            speed[name].append(tokens_per_second(model, args.new_tokens))
    return speed, (disk_size(root / "llama"), disk_size(root / "llama-dlnc"))


def row(label: str, dense: float, dlnc: float, fmt) -> None:
    print(f"| {label} | {fmt(dense)} | {fmt(dlnc)} | {dlnc / dense:.2f} |")


if __name__ == "__main__":
    main()
