"""Calibration and fine-tuning data: reading samples from a file and making model batches.

Supported inputs (`load_samples`):
  - a text file: one sample per line, or, when the file has blank lines, samples separated
    by blank lines (the lines of a sample are kept together);
  - JSONL (`.jsonl`, `.ndjson`, or `.json` holding one object per line): the text in
    `text_field`, an optional label in `label_field`;
  - a `datasets` dataset saved with `save_to_disk` (a folder; for a `DatasetDict` the
    `train` split, else the first one), with the same fields;
  - a `.safetensors` file of input tensors for models that do not take text: every tensor
    shares its first dimension (the sample index) and is passed to the model as the keyword
    argument of its name (e.g. `pixel_values`); the tensor named `label_field` (default
    `labels`) is the label.

`make_batches` turns samples into a list of model-ready keyword dicts (`input_ids`,
`attention_mask`, `labels` ...). Typical use:

    samples = load_samples("train.jsonl", label_field="label", samples=512)
    tokenizer = load_tokenizer(model_folder) if samples.is_text else None
    batches = make_batches(samples, tokenizer, max_length=128, batch_size=8)
    for batch in batches:
        model(**batch)

`load_data(DataOptions(...), model_folder, model=model)` does the three steps at once (and
holds out a share for evaluation when asked), fitting the batches to `model`: samples longer
than its positions are truncated (said once, in `Batches.notices`). Every user error (a
missing file or field, an empty file, text without a tokenizer, token ids outside the model's
vocabulary or not integers, a tensor file without the model's input) is a `DlncError`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from compressor.core.inputs import InputLimits, input_limits
from compressor.errors import DlncError, first_line

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Batches",
    "DataOptions",
    "Samples",
    "load_data",
    "load_samples",
    "load_tokenizer",
    "make_batches",
]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.*", "merges.txt", "*.model")


@dataclass
class Samples:
    """Loaded samples: texts (text data) or a dict of tensors (tensor data), plus labels.

    Exactly one of `texts` and `tensors` is set. `labels` is a 1-D tensor (int64 class ids,
    or float for regression targets) or None; string labels are mapped to ids in the sorted
    order of their names, kept in `label_names`.
    """

    texts: list[str] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    label_names: list[str] | None = None
    source: Path | None = None

    @property
    def is_text(self) -> bool:
        return self.texts is not None

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def subset(self, indices: list[int]) -> Samples:
        """The samples at `indices`, in that order."""
        index = torch.tensor(indices, dtype=torch.long)
        return Samples(
            texts=[self.texts[i] for i in indices] if self.texts is not None else None,
            tensors={k: v[index] for k, v in self.tensors.items()} if self.tensors else None,
            labels=self.labels[index] if self.labels is not None else None,
            label_names=self.label_names,
            source=self.source,
        )

    def truncated(self, length: int) -> Samples:
        """Tensor samples cut to `length` tokens: every tensor (and per-token labels) whose
        first two dimensions are those of `input_ids`."""
        shape = self.tensors["input_ids"].shape[:2]

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:, :length] if t.ndim >= 2 and t.shape[:2] == shape else t

        labels = cut(self.labels) if self.labels is not None else None
        return replace(self, tensors={k: cut(v) for k, v in self.tensors.items()}, labels=labels)


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how to turn it into batches (the CLI's data options)."""

    path: Path  # text, JSONL, a save_to_disk folder, or a .safetensors file of inputs
    text_field: str = "text"  # JSONL / dataset field holding the text
    label_field: str | None = None  # field holding a label (classification / regression)
    tokenizer: Path | None = None  # tokenizer folder; default: the model's folder
    max_length: int = 128  # tokens per sample (longer samples are truncated)
    samples: int | None = None  # use at most this many samples (a seeded random subset)
    seed: int = 0  # seed of the subset (and of anything random downstream)
    batch_size: int = 8  # samples per batch

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise DlncError(f"`max_length` must be >= 1, got {self.max_length}")
        if self.samples is not None and self.samples < 1:
            raise DlncError(f"`samples` must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise DlncError(f"`batch_size` must be >= 1, got {self.batch_size}")


def load_samples(
    path: str | os.PathLike,
    text_field: str = "text",
    label_field: str | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> Samples:
    """Read samples from `path` (see the module docstring for the formats).

    `samples=N` keeps a random subset of N (drawn with `seed`, kept in file order).
    """
    path = Path(path)
    if not path.exists():
        raise DlncError(f"{path}: no such data file or folder")
    if path.is_dir():
        loaded = _read_saved_dataset(path, text_field, label_field)
    elif path.suffix == ".safetensors":
        loaded = _read_tensors(path, label_field or "labels")
    elif path.suffix in JSONL_SUFFIXES:
        loaded = _read_jsonl(path, text_field, label_field)
    else:
        loaded = Samples(texts=_read_text(path))
    loaded.source = path
    if len(loaded) == 0:
        raise DlncError(f"{path}: holds no samples")
    if samples is not None and samples < len(loaded):
        picked = sorted(random.Random(seed).sample(range(len(loaded)), samples))
        loaded = loaded.subset(picked)
    return loaded


def _read_text(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DlncError(
            f"{path}: not UTF-8 text; give a text, JSONL, save_to_disk or .safetensors file"
        ) from e
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n")]
    if "" not in lines:
        return [line.strip() for line in lines if line.strip()]
    blocks = "\n".join(lines).split("\n\n")
    return [b.strip() for b in blocks if b.strip()]


def _read_jsonl(path: Path, text_field: str, label_field: str | None) -> Samples:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DlncError(f"{path}:{number}: not a JSON object per line ({e.msg})") from e
            if not isinstance(row, dict):
                raise DlncError(
                    f"{path}:{number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append((number, row))
    texts = [_field(row, text_field, f"{path}:{n}", "`text_field`") for n, row in rows]
    labels = None
    if label_field:
        labels = [_field(row, label_field, f"{path}:{n}", "`label_field`") for n, row in rows]
    return _text_samples(texts, labels)


def _field(row: dict, name: str, where: str, option: str):
    if name not in row:
        known = ", ".join(sorted(row)) or "none"
        raise DlncError(f"{where}: no field `{name}` (fields: {known}); pick one with {option}")
    value = row[name]
    if option == "`text_field`" and not isinstance(value, str):
        raise DlncError(f"{where}: field `{name}` is {type(value).__name__}, not text")
    return value


def _read_saved_dataset(path: Path, text_field: str, label_field: str | None) -> Samples:
    if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
        raise DlncError(f"{path}: a folder, but not a dataset saved with `save_to_disk`")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as e:
        raise DlncError("reading a saved dataset needs the `datasets` package") from e
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        data = data["train"] if "train" in data else data[next(iter(data))]
    columns = list(data.column_names)
    for name, option in ((text_field, "`text_field`"), (label_field, "`label_field`")):
        if name is not None and name not in columns:
            raise DlncError(
                f"{path}: no field `{name}` (fields: {', '.join(columns)}); pick one with {option}"
            )
    texts = data[text_field]
    if texts and not isinstance(texts[0], str):
        raise DlncError(f"{path}: field `{text_field}` is {type(texts[0]).__name__}, not text")
    return _text_samples(list(texts), list(data[label_field]) if label_field else None)


def _text_samples(texts: list[str], labels: list | None) -> Samples:
    samples = Samples(texts=texts)
    if labels is not None:
        samples.labels, samples.label_names = _label_tensor(labels)
    return samples


def _label_tensor(labels: list) -> tuple[torch.Tensor, list[str] | None]:
    if all(isinstance(x, str) for x in labels):
        names = sorted(set(labels))
        ids = {name: i for i, name in enumerate(names)}
        return torch.tensor([ids[x] for x in labels], dtype=torch.long), names
    if all(isinstance(x, bool | int) for x in labels):
        return torch.tensor([int(x) for x in labels], dtype=torch.long), None
    if all(isinstance(x, int | float) for x in labels):
        return torch.tensor(labels, dtype=torch.float32), None
    raise DlncError("labels must be all class names, all integers or all numbers")


def _read_tensors(path: Path, label_field: str) -> Samples:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DlncError(f"{path.name}: not a valid safetensors file ({e})") from e
    if not tensors:
        raise DlncError(f"{path}: holds no tensors")
    sizes = {name: t.shape[0] if t.ndim else None for name, t in tensors.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        listing = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in tensors.items())
        raise DlncError(f"{path}: tensors must share their first (sample) dimension ({listing})")
    labels = tensors.pop(label_field, None)
    if not tensors:
        raise DlncError(f"{path}: holds only labels, no input tensors")
    return Samples(tensors=tensors, labels=labels)


def load_tokenizer(
    model_folder: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of `tokenizer` (a folder), else of the model folder; local files only.

    A tokenizer without a padding token (GPT-2, Llama) pads with its end-of-text token.
    """
    where = Path(tokenizer) if tokenizer is not None else model_folder
    if where is None:
        raise DlncError("text data needs a tokenizer: pass `tokenizer` FOLDER")
    hint = "" if tokenizer is not None else "; pass `tokenizer` FOLDER"
    where = Path(where)
    if where.is_dir() and not any(any(where.glob(p)) for p in TOKENIZER_FILES):
        raise DlncError(f"{where}: no tokenizer found{hint}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if not where.exists():  # nor a Hub name in the local cache
            raise DlncError(f"{where}: no such tokenizer folder{hint}") from e
        raise DlncError(f"{where}: no tokenizer found{hint} ({first_line(e)})") from e
    if len(tok) == 0:
        raise DlncError(f"{where}: the tokenizer has an empty vocabulary{hint}")
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DlncError(f"{where}: the tokenizer has neither a padding nor an end token")
        tok.pad_token = tok.eos_token
    return tok


def make_batches(
    samples: Samples,
    tokenizer=None,
    max_length: int = 128,
    batch_size: int = 8,
    limits: InputLimits | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Model-ready batches, in sample order: keyword dicts for `model(**batch)`.

    Text: `input_ids`, `attention_mask` (+ `token_type_ids` when the tokenizer makes them),
    padded to the longest sample of the batch and truncated to `max_length`. Tensors: each
    input tensor sliced along its first dimension. `labels` is added when samples have them.
    With a model's `limits`, samples are also truncated to its positions and checked against
    its vocabulary and main input (`load_data` says how many were truncated)."""
    return _batches(samples, tokenizer, max_length, batch_size, limits)[0]


def _batches(
    samples: Samples, tokenizer, max_length: int, batch_size: int, limits: InputLimits | None
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """`make_batches`' batches and how many samples were cut to the model's positions."""
    if batch_size < 1:
        raise DlncError(f"`batch_size` must be >= 1, got {batch_size}")
    if samples.is_text and tokenizer is None:
        raise DlncError("text data needs a tokenizer, and this model has none: pass `tokenizer`")
    where = str(samples.source or "the data")
    cut = 0
    if not samples.is_text and limits is not None:
        samples, cut = _fit_tensors(samples, limits, where)
    limits = limits or InputLimits()  # (none: the batches as they come)
    batches = []
    for start in range(0, len(samples), batch_size):
        stop = min(start + batch_size, len(samples))
        if samples.is_text:
            batch, longer = _tokenize(tokenizer, samples.texts[start:stop], max_length, limits)
            hint = "; give the model's own `tokenizer`"
            batch["input_ids"] = limits.check_ids(batch["input_ids"], f"{where}, tokenized", hint)
            cut += longer
        else:
            batch = {k: v[start:stop] for k, v in samples.tensors.items()}
        if samples.labels is not None:
            batch["labels"] = samples.labels[start:stop]
        batches.append(batch)
    return batches, cut


def _tokenize(
    tokenizer, texts: list[str], max_length: int, limits: InputLimits
) -> tuple[dict[str, torch.Tensor], int]:
    """A batch of `texts` truncated to `max_length`, and to the model's positions when some
    are longer (with how many were)."""

    def encode(length: int) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=length,
                              return_tensors="pt"))  # fmt: skip

    batch = encode(max_length)
    positions = limits.positions
    if positions is None or batch["input_ids"].shape[1] <= positions:
        return batch, 0
    mask = batch.get("attention_mask")
    longer = int((mask.sum(1) > positions).sum()) if mask is not None else len(texts)
    return encode(positions), longer


def _fit_tensors(samples: Samples, limits: InputLimits, where: str) -> tuple[Samples, int]:
    """Tensor samples the model can read (`InputLimits.check_tensors`), cut to its positions
    (with how many samples were)."""
    fitted = replace(samples, tensors=limits.check_tensors(samples.tensors, where))
    ids = fitted.tensors.get("input_ids")
    if ids is None or ids.ndim < 2 or limits.positions is None or ids.shape[1] <= limits.positions:
        return fitted, 0
    return fitted.truncated(limits.positions), len(samples)


@dataclass
class Batches:
    """Model-ready batches from the data options: for training (or calibration) and held out."""

    train: list[dict[str, torch.Tensor]]
    held_out: list[dict[str, torch.Tensor]] | None  # None: nothing held out
    tokenizer: PreTrainedTokenizerBase | None  # None for tensor data
    samples: int  # samples read (train + held out)
    notices: list[str] = field(default_factory=list)  # what the user should be told

    @property
    def mask_token_id(self) -> int | None:
        return getattr(self.tokenizer, "mask_token_id", None)


def load_data(
    options: DataOptions,
    model_folder: str | os.PathLike | None,
    *,
    eval_data: DataOptions | None = None,
    eval_fraction: float = 0.0,
    model: nn.Module | None = None,
) -> Batches:
    """The one way data is read: samples, the tokenizer (text only; from `options.tokenizer`,
    else the model's folder) and batches. The held-out part is `eval_data`, else the last
    `eval_fraction` of the samples (none when 0). With `model`, the batches fit it
    (`make_batches`' limits): how many samples were cut to its positions is one notice."""
    samples = load_samples(
        options.path, options.text_field, options.label_field, options.samples, options.seed
    )
    tokenizer = load_tokenizer(model_folder, options.tokenizer) if samples.is_text else None
    limits = input_limits(model) if model is not None else None
    train, held = _split(samples, options, eval_data, eval_fraction)
    parts = [p for p in (train, held) if p is not None]
    made = [_batches(p, tokenizer, options.max_length, options.batch_size, limits) for p in parts]
    total, cut = sum(len(p) for p in parts), sum(n for _, n in made)
    notices = []
    if cut:
        where = options.path if eval_data is None else f"{options.path} and {eval_data.path}"
        notices.append(
            f"{where}: {cut} of {total} samples are longer than the model's "
            f"{limits.positions} positions: truncated to {limits.positions} tokens"
        )
    return Batches(
        train=made[0][0],
        held_out=made[1][0] if held is not None else None,
        tokenizer=tokenizer,
        samples=total,
        notices=notices,
    )


def _split(
    samples: Samples, options: DataOptions, eval_data: DataOptions | None, eval_fraction: float
) -> tuple[Samples, Samples | None]:
    if eval_data is not None:
        ev = eval_data
        return samples, load_samples(ev.path, ev.text_field, ev.label_field, ev.samples, ev.seed)
    n_eval = round(len(samples) * eval_fraction)
    if not n_eval:
        return samples, None
    if len(samples) - n_eval < 1:
        raise DlncError(f"{options.path}: too few samples to hold {n_eval} out for evaluation")
    cut = len(samples) - n_eval
    return samples.subset(list(range(cut))), samples.subset(list(range(cut, len(samples))))
