"""The evaluations papers report, on an export or any model folder: perplexity on a text file
with the windowed protocol (training/perplexity.py), and lm-evaluation-harness tasks through
its Python API (`lm_eval.simple_evaluate` on an `HFLM` wrapping the loaded model object, so a
factorized export is evaluated as dlnc loads it)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from torch import nn

from compressor.errors import DlncError, first_line
from compressor.training.perplexity import Perplexity, check_window, window_perplexity

__all__ = ["run_tasks", "text_perplexity"]


def text_perplexity(
    model_path: str | os.PathLike,
    text_file: str | os.PathLike,
    seq_len: int,
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 1,
) -> Perplexity:
    """Perplexity of the causal LM at `model_path` on the whole of `text_file`."""
    from compressor.training.data import load_tokenizer

    model = _causal_lm(model_path)
    check_window(model, seq_len)  # before the text is read and tokenized
    tok = load_tokenizer(model_path, tokenizer)
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    return window_perplexity(model, ids, seq_len, batch_size)


def run_tasks(
    model_path: str | os.PathLike,
    tasks: Sequence[str],
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness `tasks` (names, or paths of task YAML files) on the model at
    `model_path`: {task: {metric: value}}."""
    harness = _import_harness()
    from compressor.training.data import load_tokenizer
    from compressor.workflows.finetune import load_model

    names, folders = _task_names(tasks)
    manager = harness.TaskManager(
        include_path=folders or None, include_defaults=len(folders) < len(names)
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DlncError(f"`tasks`: unknown task {unknown[0]!r} (lm-eval's names, or a task YAML)")
    lm = harness.HFLM(
        pretrained=load_model(model_path), tokenizer=load_tokenizer(model_path, tokenizer),
        batch_size=batch_size,
    )  # fmt: skip
    try:
        out = harness.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=False, bootstrap_iters=0,
        )  # fmt: skip
    except (ValueError, KeyError, OSError, FileNotFoundError) as e:
        raise DlncError(f"`tasks` {names}: lm-eval failed ({first_line(e)})") from e
    return {task: _metrics(values) for task, values in out["results"].items()}


def _causal_lm(model_path: str | os.PathLike) -> nn.Module:
    from compressor.workflows.finetune import load_model

    model = load_model(model_path)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or not model.can_generate():
        kind = type(model).__name__
        raise DlncError(f"`seq_len`: perplexity needs a causal language model, got {kind}")
    return model


def _import_harness() -> SimpleNamespace:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DlncError("`tasks` needs lm-evaluation-harness: pip install 'dlnc[eval]'") from e
    return SimpleNamespace(simple_evaluate=simple_evaluate, HFLM=HFLM, TaskManager=TaskManager)


def _task_names(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """Task names, and the folders of the ones given as YAML files (lm-eval's include_path)."""
    names, folders = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix not in (".yaml", ".yml"):
            names.append(task)
            continue
        if not path.is_file():
            raise DlncError(f"`tasks`: {path}: no such task file")
        found = re.search(r"^task:\s*(\S+)", path.read_text(), re.MULTILINE)
        if found is None:
            raise DlncError(f"`tasks`: {path} has no `task:` name")
        names.append(found.group(1).strip("'\""))
        folders.append(str(path.resolve().parent))
    return names, sorted(set(folders))


def _metrics(values: dict) -> dict[str, float]:
    """lm-eval's `acc,none` -> `acc`; stderr and non-numbers left out."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, bool) or not isinstance(value, int | float) or "stderr" in metric:
            continue
        out[metric if filt in ("", "none") else f"{metric} ({filt})"] = float(value)
    return out
