"""Quality at a size, causal LM: dlnc against the simple alternatives on a GPT-2 trained here.

The causal-LM case of benchmarks/quality.py (issue 11). Offline: a byte-level BPE tokenizer
(`--vocab` tokens) and a small GPT-2 (`--layers` x `--hidden`, context `--context`) are
trained here on prose from the documentation installed on this machine (data_aware.py's
`prose_corpus`: train / calibration / held-out split by source file), for `--train-minutes`
of wall clock (AdamW, warm-up then cosine decay over the time budget). Model and tokenizer
are cached in `--cache`/<settings>/, so a second run with the same settings reuses them.
Metric: perplexity on held-out blocks of `--context` tokens (the dense model's is printed).
Rows (the targeted layers, the gpt2 recipe's c_attn, c_proj, c_fc, kept at `--keeps`; the LM
head and the embeddings are left alone):
  dlnc default       whiten with output-aware ranks and factors (`dlnc compress --data`)
  dlnc uniform       dlnc's plain whitening, the same fraction of every layer
  plain SVD          truncated SVD, the same fraction of every layer (no data)
  structured prune   attention heads + MLP neurons by L2 weight magnitude, by hand (below):
                     round(keep x heads) heads per block, then as many MLP neurons as bring
                     the block's targeted weights to `keep`
torch-pruning (1.6) cannot prune GPT-2: it does not know transformers' Conv1D (its graph
fails to build), and with the Conv1D layers swapped for nn.Linear it mis-indexes the fused
q/k/v projection when pruning heads. Hence the pruning by hand, with the same criterion as
quality.py's torch-pruning row (L2 magnitude of each head's / neuron's weights).
Fine-tuning rows (`--finetune`, at `--ft-keep`): the dlnc default start with dlnc's
fine-tuning (the gpt2 recipe: distillation, KL on the next-token logits at T=2, depth 3,
lr 1e-4 with warm-up + cosine), and the two outside baselines with a plain distillation
written here (KL(teacher || student) of the next-token distribution, T=1, AdamW 1e-4
constant): from a uniform whitened start, and after pruning. Batches of 32 x `--context`
tokens. Cells: held-out perplexity; after fine-tuning also the wall time at that point
(compression incl. statistics + training so far).

    python benchmarks/quality_lm.py [--keeps 0.3 0.5 0.7] [--finetune default distill prune]
                                    [--ft-keep 0.5] [--steps 100 300] [--threads 1]
                                    [--train-minutes 10] [--cache DIR] [--out FILE]

`--model smollm2` benchmarks a real pretrained LM instead, SmolLM2-135M-Instruct (its rows,
flags and table: benchmarks/smollm2.py; `--model smollm2 --help`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that sleep when idle instead of spinning: on a machine whose cores other jobs
# share, spinning threads made a 576 x 576 SVD take seconds instead of 0.1 s (read when torch
# loads, so set here; the dlnc subprocesses of --model smollm2 inherit it; override it by
# setting OMP_WAIT_POLICY yourself)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from data_aware import perplexity, prose_corpus  # benchmarks/ is the script folder, on sys.path
from quality import Compressors
from quality import table as quality_table

from compressor.core.targets import find_targets
from compressor.recipes.schema import load_recipe
from compressor.training.data import load_tokenizer

RESULTS = Path(__file__).parent / "results" / "quality_lm.md"
CACHE = Path("/tmp/dlnc-quality-lm")
EOS = "<|endoftext|>"
TARGETED = ("c_attn", "c_proj", "c_fc")


# ---- the model: tokenizer, blocks, training, cache ----------------------------------------


def train_tokenizer(texts: list[str], folder: Path, vocab: int):
    """A byte-level BPE of `vocab` tokens (every byte in its alphabet: nothing is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(folder)
    return load_tokenizer(folder)


def lm_blocks(tok, texts: list[str], length: int) -> torch.Tensor:
    """The texts' tokens, each text followed by EOS, concatenated and cut into [n, length]."""
    ids: list[int] = []
    for encoded in tok(texts)["input_ids"]:
        ids += encoded
        ids.append(tok.eos_token_id)
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def spread(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """`n` blocks evenly spaced over all of them (every source file has its say)."""
    if n >= len(blocks):
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, n).long()]


def lm_config(tok, args):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok), n_positions=args.context, n_embd=args.hidden, n_layer=args.layers,
        n_head=args.hidden // 32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, use_cache=False,
    )  # fmt: skip


def train_lm(model, train: torch.Tensor, minutes: float, batch: int = 16, lr: float = 2e-3):
    """Train for `minutes` of wall clock: AdamW (decay on matrices), 30 warm-up steps, then a
    cosine decay to lr/10 laid out over the time budget (so it ends where the budget does)."""
    matrices = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    order, used = torch.randperm(len(train), generator=g), 0
    budget, start, step, report = minutes * 60, time.perf_counter(), 0, 60.0
    losses: list[float] = []
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        decay = 0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / budget))  # 1 -> 0.1
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * decay
        if used + batch > len(order):
            order, used = torch.randperm(len(train), generator=g), 0
        ids = train[order[used : used + batch]]
        used += batch
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if elapsed >= report:
            recent = sum(losses[-20:]) / len(losses[-20:])
            print(f"  {elapsed / 60:4.1f} min: step {step}, training loss {recent:.3f}", flush=True)
            report += 60.0
    model.eval()
    tokens = step * batch * train.shape[1]
    return {"steps": step, "tokens": tokens, "seconds": round(elapsed, 1), "batch": batch,
            "lr": lr, "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1)}  # fmt: skip


def cached_lm(train_text: list[str], args):
    """(model, tokenizer, training info) from `--cache`/<settings>/, trained first if absent."""
    from transformers import GPT2LMHeadModel

    key = (f"gpt2-{args.layers}x{args.hidden}-v{args.vocab}-c{args.context}"
           f"-{args.train_minutes:g}min")  # fmt: skip
    folder = args.cache / key
    if not (folder / "meta.json").is_file():
        tmp = folder.with_name(key + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t = time.perf_counter()
        tok = train_tokenizer(train_text, tmp, args.vocab)
        train = lm_blocks(tok, train_text, args.context)
        print(f"tokenizer: {len(tok)} tokens, {time.perf_counter() - t:.0f} s; training split "
              f"{train.numel()} tokens; training {key} for {args.train_minutes:g} min with "
              f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
        torch.manual_seed(0)
        model = GPT2LMHeadModel(lm_config(tok, args))
        info = train_lm(model, train, args.train_minutes)
        info.update(threads=torch.get_num_threads(), train_tokens=train.numel(),
                    params=sum(p.numel() for p in model.parameters()))  # fmt: skip
        model.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps(info, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    info = json.loads((folder / "meta.json").read_text())
    info["folder"] = str(folder)
    return GPT2LMHeadModel.from_pretrained(folder).eval(), load_tokenizer(folder), info


# ---- measuring ----------------------------------------------------------------------------


def lm_targets(model):
    """The gpt2 recipe's targets: c_attn, c_proj (attention and MLP) and c_fc of every block."""
    recipe = load_recipe("gpt2").targets
    return find_targets(model, recipe.include, recipe.exclude)


def targeted_params(model) -> int:
    """Weight parameters of the targeted layers (dense, factorized or pruned; no biases)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if ".h." in n and any(f".{t}." in n for t in TARGETED) and not n.endswith("bias")
    )


def as_batches(blocks: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    """Model-ready batches of whole blocks (no padding: the mask is all ones)."""
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(size)]


# ---- the rows -----------------------------------------------------------------------------


def structured_prune(model, keep: float):
    """By hand (torch-pruning cannot, see the module docstring): in every block keep the
    round(keep x heads) attention heads of largest L2 weight magnitude (their q, k, v columns
    of c_attn and rows of c_proj), then the MLP neurons of largest magnitude (c_fc columns,
    c_proj rows), as many as bring the block's targeted weights to `keep` of the original."""
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        e, h, d = attn.embed_dim, attn.num_heads, attn.head_dim
        inner = mlp.c_fc.nf
        heads = max(1, round(keep * h))
        neurons = round((keep * (4 * e * e + 2 * e * inner) - 4 * e * heads * d) / (2 * e))
        neurons = min(max(1, neurons), inner)
        # Conv1D stores its weight as (in, out); c_attn's out is q | k | v, each head by head
        score = attn.c_attn.weight.detach().view(e, 3, h, d).square().sum((0, 1, 3))
        score += attn.c_proj.weight.detach().view(h, d, e).square().sum((1, 2))
        kept = score.topk(heads).indices.sort().values
        dims = (kept[:, None] * d + torch.arange(d)).flatten()
        _keep_outputs(attn.c_attn, torch.cat([dims + i * e for i in range(3)]))
        _keep_inputs(attn.c_proj, dims)
        attn.num_heads, attn.split_size = heads, heads * d
        score = mlp.c_fc.weight.detach().square().sum(0)
        score += mlp.c_proj.weight.detach().square().sum(1)
        kept = score.topk(neurons).indices.sort().values
        _keep_outputs(mlp.c_fc, kept)
        _keep_inputs(mlp.c_proj, kept)
    return model


def _keep_outputs(conv, index: torch.Tensor) -> None:
    conv.weight = torch.nn.Parameter(conv.weight.detach()[:, index].clone())
    conv.bias = torch.nn.Parameter(conv.bias.detach()[index].clone())
    conv.nf = len(index)


def _keep_inputs(conv, index: torch.Tensor) -> None:
    conv.weight = torch.nn.Parameter(conv.weight.detach()[index].clone())
    conv.nx = len(index)


# ---- fine-tuning --------------------------------------------------------------------------


def plain_distill(student, teacher, batches, steps, judge, at):
    """The outside baseline: KL(teacher || student) of the next-token distribution (T=1, mean
    over tokens), AdamW 1e-4 constant. Evaluates at each step count in `at`; returns
    {step: (perplexity, training seconds so far)} and the training seconds."""
    student.requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scores, seconds, t = {}, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        b = batches[(step - 1) % len(batches)]
        student.train()
        with torch.no_grad():
            target = F.log_softmax(teacher(**b).logits.float(), dim=-1).flatten(0, 1)
        log_q = F.log_softmax(student(**b).logits.float(), dim=-1).flatten(0, 1)
        loss = F.kl_div(log_q, target, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in at:
            seconds += time.perf_counter() - t
            scores[step] = (judge(student.eval()), seconds)
            t = time.perf_counter()
    return scores, seconds


def dlnc_finetune(student, teacher, batches, steps, judge, at):
    """dlnc's own fine-tuning with the gpt2 recipe's settings, one run per step count (the
    schedule depends on it); returns {step: (perplexity, that run's training seconds)} and
    the seconds of the last."""
    from compressor.training.loop import finetune
    from compressor.workflows.options import finetune_config

    scores, seconds = {}, 0.0
    for n in sorted(at):
        work = copy.deepcopy(student).requires_grad_(True)
        config = finetune_config(load_recipe("gpt2"), steps=n)
        t = time.perf_counter()
        result = finetune(work, batches, teacher=teacher, config=config)
        seconds = time.perf_counter() - t
        scores[n] = (judge(result.model), seconds)
    return scores, seconds


# ---- report -------------------------------------------------------------------------------


def fmt(score, start: float = 0.0) -> str:
    """Perplexity, and for a fine-tuning score the wall time at that point (compression plus
    the training so far)."""
    if score is None:
        return "-"
    if isinstance(score, tuple):
        return f"{score[0]:.1f} ({start + score[1]:.0f} s)"
    return f"{score:.1f}"


def main() -> None:
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2",
                      help="gpt2: the GPT-2 trained here (this file); smollm2: "
                      "SmolLM2-135M-Instruct (benchmarks/smollm2.py, its own flags)")  # fmt: skip
    chosen, rest = pick.parse_known_args()
    if chosen.model == "smollm2":
        from smollm2 import main as smollm2_main

        smollm2_main(rest)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[pick])
    parser.add_argument("--keeps", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    rows = ["default", "uniform", "svd", "prune"]
    parser.add_argument("--rows", nargs="+", default=rows)
    parser.add_argument("--finetune", nargs="*", default=[],
                        help="fine-tuning rows: default distill prune")  # fmt: skip
    parser.add_argument("--ft-keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--calibration", type=int, default=64, help="calibration blocks")
    parser.add_argument("--held", type=int, default=256, help="held-out blocks (perplexity)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-minutes", type=float, default=10.0,
                        help="the LM's training budget (when not cached)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the LM is cached")
    parser.add_argument("--vocab", type=int, default=2048, help="tokenizer vocabulary")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="width (heads of 32)")
    parser.add_argument("--context", type=int, default=128, help="tokens per block")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the table is written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    train_text, calib_text, held_text = prose_corpus()
    original, tok, info = cached_lm(train_text, args)
    held = spread(lm_blocks(tok, held_text, args.context), args.held)
    calib = spread(lm_blocks(tok, calib_text, args.context), args.calibration)

    def judge(model) -> float:
        return perplexity(model.eval(), held)

    dense = judge(original)
    described = (
        f"GPT-2 {args.layers} x {args.hidden} ({info['params'] / 1e6:.1f} M parameters, vocab "
        f"{len(tok)}, context {args.context}) trained here: {info['steps']} steps of "
        f"{info['batch']} x {args.context} tokens ({info['tokens'] / info['train_tokens']:.1f} "
        f"passes over the training split's {info['train_tokens'] / 1e6:.2f} M tokens) in "
        f"{info['seconds']:.0f} s "
        f"with {info['threads']} threads"
    )
    print(f"{described}; cached in {info['folder']}", flush=True)
    print(f"dense held-out perplexity: {dense:.2f} ({len(held)} blocks of {args.context} "
          f"tokens)", flush=True)  # fmt: skip
    comp = Compressors(original, as_batches(calib, 16), find=lm_targets, prune=structured_prune)
    full = targeted_params(original)
    labels = {"default": "dlnc default", "uniform": "dlnc uniform (whiten)",
              "svd": "plain SVD (uniform)",
              "prune": "structured prune (magnitude, by hand)"}  # fmt: skip
    rows = [{"keep": 1, "row": "dense (trained here)", "kept": 1.0, "before": dense,
             "after": {}, "seconds": 0.0, "compress_s": 0.0}]  # fmt: skip
    for keep in args.keeps:
        for name in args.rows:
            model, secs = getattr(comp, name)(keep)
            rows.append({"keep": keep, "row": labels[name], "kept": targeted_params(model) / full,
                         "before": judge(model), "after": {}, "seconds": secs,
                         "compress_s": secs})  # fmt: skip
            print(quality_table(rows[-1:], args.steps, fmt).splitlines()[-1], flush=True)
    train_b = []
    if args.finetune:  # the training split in a seeded order, 32 blocks a batch
        blocks = lm_blocks(tok, train_text, args.context)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
        train_b = as_batches(blocks[order], 32)
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
        print(quality_table(rows[-1:], args.steps, fmt).splitlines()[-1], flush=True)
    batches = (
        f"{len(train_b)} fine-tuning batches of 32 x {args.context} tokens. " if train_b else ""
    )
    text = (
        f"`python {' '.join(sys.argv)}`; torch {torch.__version__}, {args.threads} threads. "
        f"{described}. {batches}Cells: held-out perplexity ({len(held)} blocks of "
        f"{args.context} tokens; dense: {dense:.2f}).\n\n{quality_table(rows, args.steps, fmt)}\n"
    )
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
