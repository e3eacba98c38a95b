"""README.md of an export: a Hugging Face model card.

Metadata in the YAML header that the Hub reads (huggingface_hub's `ModelCardData`):
`base_model` with `base_model_relation: quantized` (the Hub's relation for a smaller copy of
the same model), `library_name`, `pipeline_tag`, tags, and the base card's license, language
and datasets. Then the compression table (method, keep, ranks per layer group, parameters and
weight bytes before and after), the held-out numbers before and after (compression and
fine-tuning), every dlnc command of the chain with the dlnc version, and how to load it.
Every number comes from the model being exported, so the card is right for API exports too.

The provenance (`base_model`, the commands, the version) is carried from export to export in
config.json's `dlnc` section: an export made from an export (`dlnc finetune`) keeps its base
and appends its own command.
"""

from __future__ import annotations

import re
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from compressor.io.card_facts import CardFacts
from compressor.io.section import dlnc_version

__all__ = [
    "Provenance",
    "base_card_metadata",
    "model_card",
    "provenance",
    "write_model_card",
]

TAGS = ["dlnc", "low-rank", "compressed"]
FOLDER = "path/to/this/folder"
RELATION = "quantized"
"""`base_model_relation`: of the Hub's four (adapter, merge, quantized, finetune), the one for
a smaller copy of the base model that stands in for it (the model tree's "Quantizations");
dlnc's fine-tuning recovers the base's behaviour, so a fine-tuned export keeps it."""
CARRIED = ("license", "license_name", "license_link", "language", "datasets", "pipeline_tag")
"""The base card's metadata that holds for the compressed model too (its evaluation results,
`model-index`, do not)."""
ST_FILES = ("modules.json", "config_sentence_transformers.json")
"""A folder with one of these is a sentence-transformers model."""
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
     "text-classification"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
     "token-classification"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
     "question-answering"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
     "image-classification"),
    ("AutoModel", "MODEL_MAPPING_NAMES", "feature-extraction"),
)  # fmt: skip
"""The transformers class that loads an architecture (the first whose table names it) and
the card's `pipeline_tag` when the base card has none."""


@dataclass
class Provenance:
    """Where an export comes from, kept in config.json's `dlnc` section from export to export."""

    base_model: str | None  # the Hub id of the original model (None: not a Hub model)
    commands: list[str]  # the dlnc commands of the chain, the first one first, this one last
    metadata: dict  # the base card's `CARRIED` fields and its tags
    version: str = field(default_factory=dlnc_version)  # the dlnc that wrote this export

    def section(self) -> dict:
        """What config.json's `dlnc` section records of it."""
        return {"dlnc_version": self.version, "base_model": self.base_model,
                "commands": self.commands}  # fmt: skip


PROVENANCE = ("base_model", "commands")
"""The keys of the `dlnc` section that say where a model came from (with `dlnc_version`)."""


def provenance(
    source: str | Path | None, config: object | None, command: str | None = None
) -> Provenance:
    """The provenance of an export of the model read from `source` by `command` (this
    process's command line by default): an export's `source` passes on its base model, its
    commands and its card's metadata; any other's base is found from its path or config."""
    earlier = _earlier_section(source)
    base = earlier.get("base_model") or base_model_id(source, config)
    commands = [*earlier.get("commands", []), command or invocation()]
    return Provenance(base, commands, base_card_metadata(source))


def _earlier_section(source: str | Path | None) -> dict:
    """config.json's `dlnc` section of `source` when it is an export (else empty)."""
    import json

    path = Path(source) / "config.json" if source is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        section = json.loads(path.read_text(encoding="utf-8")).get("dlnc")
    except (ValueError, AttributeError):
        return {}
    return section if isinstance(section, dict) else {}


def base_card_metadata(source: str | Path | None) -> dict:
    """The `CARRIED` fields and the tags of the YAML header of `source`'s README.md (empty
    when there is none, or it cannot be read: a base card never stops an export)."""
    import yaml
    from huggingface_hub import ModelCard

    path = Path(source) / "README.md" if source is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    kept = {k: data[k] for k in CARRIED if data.get(k)}
    tags = data.get("tags")
    if isinstance(tags, list) and tags:
        kept["tags"] = [str(t) for t in tags if t != "merged"]
    return kept


def model_card(
    facts: CardFacts,
    *,
    config: object | None,
    source: str | Path | None,
    command: str | None = None,
    origin: Provenance | None = None,
    folder: str | Path | None = None,
) -> str:
    """The README.md text. `origin` is the export's provenance (by default: `source`'s,
    with `command`); `folder` the export's files (a sentence-transformers model is
    recognised by its side files there, else in `source`)."""
    from huggingface_hub import ModelCardData

    origin = origin or provenance(source, config, command)
    base = origin.base_model
    library = _library(config, folder if folder is not None else source)
    tags = [*TAGS, facts.method] + (["merged"] if facts.merged else [])
    tags += [t for t in origin.metadata.get("tags", []) if t not in tags]
    carried = {k: v for k, v in origin.metadata.items() if k != "tags"}
    carried.setdefault("pipeline_tag", _pipeline_tag(config, library))
    meta = ModelCardData(
        base_model=base, base_model_relation=RELATION if base else None,
        library_name=library, tags=tags, **carried,
    ).to_yaml()  # fmt: skip
    name = base or (Path(source).name if source is not None else "model")
    title = f"{name}, compressed with dlnc"
    parts = [
        f"---\n{meta}\n---\n",
        f"# {title}\n",
        _intro(facts, base, source),
        _size_table(facts),
        _rank_table(facts),
        _evaluation_table(facts),
        _chain(origin),
        "## How to load it\n\n```python\n" + _load_snippet(config, facts, library) + "```\n",
    ]
    return "\n".join(p for p in parts if p)


def write_model_card(
    folder: Path,
    facts: CardFacts,
    *,
    config: object | None,
    source: str | Path | None,
    origin: Provenance | None = None,
) -> Path:
    """Write `folder/README.md` for an export (replacing a copied base-model card)."""
    path = folder / "README.md"
    text = model_card(facts, config=config, source=source, origin=origin, folder=folder)
    path.write_text(text, encoding="utf-8")
    return path


def base_model_id(source: str | Path | None, config: object | None) -> str | None:
    """The Hub id of the original model: from a Hub cache path (`models--org--name`), else the
    config's `_name_or_path` when it is an id rather than a local folder; None if unknown."""
    from compressor.io.checkpoint import hub_cache_id

    if source is not None and hub_cache_id(source) is not None:
        return hub_cache_id(source)
    name = getattr(config, "_name_or_path", "") or ""
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None
    return name if looks_like_id and not Path(name).exists() else None


def invocation() -> str:
    """The dlnc command line of this process, or a note that the Python API wrote it."""
    prog = Path(sys.argv[0]) if sys.argv else Path()
    cli = Path(__file__).resolve().parents[2] / "cli"  # `python -m cli`, `python cli/main.py`
    ours = prog.name == "dlnc" or prog.resolve().parent == cli
    if ours and len(sys.argv) > 1:
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
        if "after_quantize" in ppl:
            rows.append(f"| the same after quantization | | {ppl['after_quantize']:.2f} |")
    ratio = facts.params_after / max(facts.params_before, 1)
    return (
        "## Compression\n\n"
        f"method `{facts.method}`, keep {keep}, {sum(map(len, facts.groups.values()))} layers "
        f"factorized; parameters after / before = {ratio:.3f}{_quantized_line(facts)}\n\n"
        + "\n".join(rows)
        + "\n"
    )


def _quantized_line(facts: CardFacts) -> str:
    """What the card says of quantized weights (nothing for float ones)."""
    q = facts.quantization
    if not q:
        return ""
    group = "a scale a row" if q["group_size"] == 0 else f"groups of {q['group_size']}"
    memory = q.get("load_memory_bytes")
    held = f"; loaded, it holds {memory / 1e6:.1f} MB of tensors" if memory else ""
    return (
        f"; the targeted layers' weights stored as int{q['bits']} codes ({group}, rounded by "
        f"{q['rounding']}), {q['bits_per_weight']:.2f} bits a weight{held}"
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


def _evaluation_table(facts: CardFacts) -> str:
    """Fine-tuning's held-out numbers: the original, the compressed model before, and after."""
    evals = facts.evaluation or {}
    if "after" not in evals:
        return ""
    stages = [evals.get(k) or {} for k in ("original", "before", "after")]
    rows = ["| held-out metric | original | compressed | fine-tuned |", "|---|---:|---:|---:|"]
    for key, label in EVAL_ROWS:
        values = [s.get(key) for s in stages]
        if values[2] is not None:
            cells = " | ".join("-" if v is None else f"{v:.4g}" for v in values)
            rows.append(f"| {label} | {cells} |")
    samples = stages[2].get("samples")
    return (
        f"## Fine-tuning\n\nheld out: {samples} samples the training did not see\n\n"
        + "\n".join(rows) + "\n"
    )  # fmt: skip


EVAL_ROWS = (
    ("loss", "task loss"),
    ("perplexity", "perplexity"),
    ("accuracy", "accuracy"),
    ("distill", "distillation loss to the original"),
    ("cosine", "cosine to the original's embeddings"),
)


def _chain(origin: Provenance) -> str:
    commands = "\n".join(origin.commands)
    return (
        f"## How it was made\n\nwith dlnc {origin.version}, by these commands in turn:\n\n"
        f"```bash\n{commands}\n```\n"
    )


def _library(config: object | None, folder: str | Path | None) -> str:
    """The card's `library_name`: dlnc (tensor mode), sentence-transformers or transformers."""
    if config is None:
        return "dlnc"
    if folder is not None and any((Path(folder) / f).is_file() for f in ST_FILES):
        return "sentence-transformers"
    return "transformers"


def _auto_class(config: object) -> tuple[str, str | None]:
    """The transformers class that loads `config`'s architecture and its pipeline tag."""
    from transformers.models.auto import modeling_auto

    arch = next(iter(getattr(config, "architectures", None) or ()), None)
    for auto, table, tag in AUTO_CLASSES:
        names = getattr(modeling_auto, table, {}).values()
        if any(arch == n or (isinstance(n, tuple) and arch in n) for n in names):
            return auto, tag
    return arch or "AutoModel", None


def _pipeline_tag(config: object | None, library: str) -> str | None:
    if library == "sentence-transformers":
        return "sentence-similarity"
    return _auto_class(config)[1] if config is not None else None


def _load_snippet(config: object | None, facts: CardFacts, library: str) -> str:
    """How to load the export: the one place that says it (tensor mode, sentence-transformers,
    transformers; factorized layers need `import compressor`, merged ones do not)."""
    if config is None:
        return (
            "import compressor\n\n"
            "# tensor mode: weights only; pass an instance of the original module to run it\n"
            f'model = compressor.load_pretrained("{FOLDER}", model=MyModule())\n'
        )
    importing = (
        ""
        if facts.merged
        else "import compressor  # dlnc (from its source): registers the factorized layers\n"
    )
    if library == "sentence-transformers":
        return (
            f"{importing}from sentence_transformers import SentenceTransformer\n\n"
            f'model = SentenceTransformer("{FOLDER}")\n'
            'embeddings = model.encode(["The first sentence.", "The second one."])\n'
        )
    arch = _auto_class(config)[0]
    loading = f'from transformers import {arch}\n\nmodel = {arch}.from_pretrained("{FOLDER}")\n'
    if facts.merged:
        return loading
    return (
        f'{importing}{loading}# or: model = compressor.load_pretrained("{FOLDER}")\n'
        + _portable(config)
    )


def _portable(config: object) -> str:
    """The line that loads a factorized export without dlnc, when it carries modeling_dlnc.py."""
    from compressor.io.portable import auto_class_for, auto_map

    if not auto_map(config):
        return ""
    return (
        "# without dlnc (transformers alone, the export's modeling_dlnc.py):\n"
        f'# model = transformers.{auto_class_for(config)}.from_pretrained("{FOLDER}", '
        "trust_remote_code=True)\n"
    )
