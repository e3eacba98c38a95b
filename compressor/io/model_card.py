"""README.md of an export: a Hugging Face model card.

Metadata (`base_model` when the source is a Hub model, `library_name`, tags) in the YAML
header that the Hub reads; then the compression table (method, keep, ranks per layer group,
parameters and weight bytes before and after), the command that produced it and how to load
it. Every number comes from the model being exported, so the card is right for API exports too.
"""

from __future__ import annotations

import re
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compressor.core.surgery import count_params, factorized_layers
from compressor.io.section import check_format

__all__ = ["CardFacts", "card_facts", "model_card", "report_facts", "write_model_card"]

TAGS = ["dlnc", "low-rank", "compressed"]
FOLDER = "path/to/this/folder"


@dataclass
class CardFacts:
    """What the card states about an export."""

    method: str
    merged: bool
    keep: float | None  # the policy's keep, when known
    params_before: int
    params_after: int
    bytes_before: int  # tensor bytes of the weights (the safetensors header aside)
    bytes_after: int
    groups: dict[str, list[int]]  # layer name pattern (numbers -> *) -> ranks
    shapes: dict[str, tuple[int, int]]  # layer name pattern -> (out, in)
    perplexity: dict | None = None  # report.json's: before / after on held-out text


def card_facts(model: nn.Module, method: str, format: str, report: dict | None) -> CardFacts:
    """Sizes before/after from the model itself: each chain as exported (two factors of its
    rank, or dense for `format` "dense") against the dense layer it replaced; a tied tensor
    counted once."""
    check_format(format)
    merged = format == "dense"
    params = count_params(model)
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    chain = dense = kept = 0  # parameters: in memory / dense layers / exported factors
    chain_b = dense_b = kept_b = 0  # the same in bytes
    groups: dict[str, list[int]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for name, layer in factorized_layers(model).items():
        size = layer.up.weight.element_size()
        c = sum(p.numel() for p in layer.parameters()) - _bias(layer)
        d = layer.in_features * layer.out_features
        k = layer.rank * (layer.in_features + layer.out_features)
        chain, dense, kept = chain + c, dense + d, kept + k
        chain_b, dense_b, kept_b = chain_b + c * size, dense_b + d * size, kept_b + k * size
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        groups[pattern].append(layer.rank)
        shapes[pattern] = (layer.out_features, layer.in_features)
    before, before_b = params - chain + dense, state_bytes - chain_b + dense_b
    after, after_b = params - chain + kept, state_bytes - chain_b + kept_b
    policy = (report or {}).get("policy") or {}
    return CardFacts(
        method=method, merged=merged, keep=policy.get("keep"), params_before=before,
        params_after=before if merged else after, bytes_before=before_b,
        bytes_after=before_b if merged else after_b, groups=dict(groups), shapes=shapes,
        perplexity=(report or {}).get("perplexity"),
    )  # fmt: skip


def _bias(layer: nn.Module) -> int:
    return layer.up.bias.numel() if layer.up.bias is not None else 0


def model_card(
    facts: CardFacts,
    *,
    config: object | None,
    source: str | Path | None,
    command: str | None = None,
) -> str:
    """The README.md text."""
    from huggingface_hub import ModelCardData

    base = base_model_id(source, config)
    library = "transformers" if config is not None else "dlnc"
    tags = [*TAGS, facts.method] + (["merged"] if facts.merged else [])
    meta = ModelCardData(base_model=base, library_name=library, tags=tags).to_yaml()
    name = base or (Path(source).name if source is not None else "model")
    title = f"{name}, compressed with dlnc"
    parts = [
        f"---\n{meta}\n---\n",
        f"# {title}\n",
        _intro(facts, base, source),
        _size_table(facts),
        _rank_table(facts),
        "## How it was made\n\n```bash\n" + (command or invocation()) + "\n```\n",
        "## How to load it\n\n```python\n" + _load_snippet(config, facts) + "```\n",
    ]
    return "\n".join(p for p in parts if p)


def report_facts(report: dict, section: dict) -> CardFacts:
    """The card's facts from an export's report.json and `dlnc` section, for exports written
    without the model in memory (streamed): parameters from the report, bytes on disk."""
    groups: dict[str, list[int]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for name, spec in section.get("layers", {}).items():
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        groups[pattern].append(spec["rank"])
        shapes[pattern] = tuple(spec["shape"])
    merged = bool(section.get("merged"))
    return CardFacts(
        method=section.get("method", "svd"), merged=merged,
        keep=(report.get("policy") or {}).get("keep"),
        params_before=report.get("model_params_before") or 0,
        params_after=report.get("model_params_after") or 0,
        bytes_before=report.get("bytes_before") or 0, bytes_after=report.get("bytes_after") or 0,
        groups=dict(groups), shapes=shapes, perplexity=report.get("perplexity"),
    )  # fmt: skip


def write_model_card(
    folder: Path, facts: CardFacts, *, config: object | None, source: str | Path | None
) -> Path:
    """Write `folder/README.md` for an export (replacing a copied base-model card)."""
    path = folder / "README.md"
    path.write_text(model_card(facts, config=config, source=source), encoding="utf-8")
    return path


def base_model_id(source: str | Path | None, config: object | None) -> str | None:
    """The Hub id of the original model: from a Hub cache path (`models--org--name`), else the
    config's `_name_or_path` when it is an id rather than a local folder; None if unknown."""
    if source is not None:
        found = re.search(r"models--([\w.-]+?)--([\w.-]+)", str(source))
        if found:
            return f"{found.group(1)}/{found.group(2)}"
    name = getattr(config, "_name_or_path", "") or ""
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
    return name if looks_like_id and not Path(name).exists() else None


def invocation() -> str:
    """The dlnc command line of this process, or a note that the Python API wrote it."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog in ("dlnc", "main.py", "__main__.py") and len(sys.argv) > 1:
        return shlex.join(["dlnc", *sys.argv[1:]])
    return "# written through the Python API (compressor.export)"


def _intro(facts: CardFacts, base: str | None, source: str | Path | None) -> str:
    if base:
        origin = f"[{base}](https://huggingface.co/{base})"
    else:
        origin = f"`{Path(source).name}`" if source is not None else "The original model"
    how = "merged back to dense layers of low rank" if facts.merged else "factorized layers"
    return (
        f"{origin} compressed by [dlnc](https://pypi.org/project/dlnc/): its linear layers "
        f"rewritten as low-rank products (method `{facts.method}`), stored as {how}.\n"
    )


def _size_table(facts: CardFacts) -> str:
    keep = "-" if facts.keep is None else f"{facts.keep:g}"
    rows = [
        "| | before | after |",
        "|---|---:|---:|",
        f"| parameters | {facts.params_before:,} | {facts.params_after:,} |",
        f"| weight bytes | {facts.bytes_before:,} | {facts.bytes_after:,} |",
    ]
    ppl = facts.perplexity
    if ppl and "after" in ppl:
        text = f"perplexity on held-out {ppl['text']} ({ppl['held_out_samples']} samples)"
        rows.append(f"| {text} | {ppl['before']:.2f} | {ppl['after']:.2f} |")
        if "after_finetune" in ppl:
            rows.append(f"| the same after fine-tuning | | {ppl['after_finetune']:.2f} |")
    ratio = facts.params_after / max(facts.params_before, 1)
    return (
        "## Compression\n\n"
        f"method `{facts.method}`, keep {keep}, {sum(map(len, facts.groups.values()))} layers "
        f"factorized; parameters after / before = {ratio:.3f}\n\n" + "\n".join(rows) + "\n"
    )


def _rank_table(facts: CardFacts) -> str:
    if not facts.groups:
        return ""
    rows = [
        "| layers | shape (out x in) | count | rank min | median | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for pattern, ranks in facts.groups.items():
        out_f, in_f = facts.shapes[pattern]
        rows.append(
            f"| `{pattern}` | {out_f} x {in_f} | {len(ranks)} | {min(ranks)} | "
            f"{statistics.median(ranks):g} | {max(ranks)} |"
        )
    return "### Ranks\n\n" + "\n".join(rows) + "\n"


def _load_snippet(config: object | None, facts: CardFacts) -> str:
    if config is None:
        return (
            "import compressor\n\n"
            "# tensor mode: weights only; pass an instance of the original module to run it\n"
            f'model = compressor.load_pretrained("{FOLDER}", model=MyModule())\n'
        )
    arch = next(iter(getattr(config, "architectures", None) or ()), "AutoModel")
    if facts.merged:
        return f'from transformers import {arch}\n\nmodel = {arch}.from_pretrained("{FOLDER}")\n'
    from compressor.io.portable import auto_class_for, auto_map

    portable = ""
    if auto_map(config):
        auto = auto_class_for(config)
        portable = (
            f"# without dlnc (transformers alone, the export's modeling_dlnc.py):\n"
            f'# model = transformers.{auto}.from_pretrained("{FOLDER}", trust_remote_code=True)\n'
        )
    return (
        "import compressor  # dlnc, installed from its source: registers the factorized layers\n"
        f"from transformers import {arch}\n\n"
        f'model = {arch}.from_pretrained("{FOLDER}")\n'
        f'# or: model = compressor.load_pretrained("{FOLDER}")\n' + portable
    )
