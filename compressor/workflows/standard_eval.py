"""The evaluations papers report, on an export or any model folder: perplexity on a text file
with the windowed protocol (training/perplexity.py), and lm-evaluation-harness tasks through
its Python API (`lm_eval.simple_evaluate` on an `HFLM` wrapping the loaded model object, so a
factorized export is evaluated as dlnc loads it), on the device and in the dtype asked for.

    options = StandardEvalOptions(device="cuda", dtype="bfloat16", limit=100, num_fewshot=5,
                                  output_path="results/")
    rows = standard_eval("model-dlnc", tasks=["hellaswag"], options=options)

Every option is checked when `StandardEvalOptions` is made, and the window against the model's
positions as soon as it is loaded: before any text is read or any task runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from compressor.errors import DlncError, first_line
from compressor.training.config import DTYPES
from compressor.training.perplexity import Perplexity, check_window, window_perplexity

__all__ = ["StandardEvalOptions", "run_tasks", "standard_eval", "text_perplexity"]


@dataclass(frozen=True)
class StandardEvalOptions:
    """Where and how `--seq-len` perplexity and lm-eval tasks run, and lm-eval's knobs."""

    device: str | None = None  # cpu, cuda, cuda:N, mps (None: the first GPU if any, else cpu)
    dtype: str = "auto"  # auto (as the checkpoint is stored) | float32 | bfloat16 | float16
    batch_size: int = 1  # windows / lm-eval requests per forward pass
    tokenizer: str | os.PathLike | None = None  # a tokenizer folder (None: the model's)
    limit: float | None = None  # lm-eval: at most this many docs per task (< 1: a fraction)
    num_fewshot: int | None = None  # lm-eval: few-shot examples (None: each task's own)
    output_path: str | os.PathLike | None = None  # lm-eval's results JSON (a folder or a .json)

    def __post_init__(self) -> None:
        eval_device(self.device)
        if self.dtype not in DTYPES:
            raise DlncError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise DlncError(f"`batch_size` must be >= 1, got {self.batch_size}")
        whole = self.limit is not None and float(self.limit).is_integer()
        if self.limit is not None and not (0 < self.limit < 1 or (whole and self.limit >= 1)):
            raise DlncError(
                f"`limit` must be a number of docs >= 1 or a fraction in (0, 1), got {self.limit}"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise DlncError(f"`num_fewshot` must be >= 0, got {self.num_fewshot}")
        if self.output_path is not None:
            from compressor.io.files import check_writable

            check_writable(Path(self.output_path) / "results.json")  # lm-eval makes folders

    @property
    def harness_limit(self) -> int | float | None:
        """`limit` as lm-eval reads it: a count as an int, a fraction as a float."""
        return self.limit if self.limit is None or self.limit < 1 else int(self.limit)


def eval_device(name: str | None) -> torch.device:
    """The device `name` stands for (None: the first GPU if torch sees one, else the CPU); a
    `DlncError` for a name torch does not parse or a device this machine does not have."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise DlncError(f"`device` must be cpu, cuda, cuda:N or mps, got {name!r}") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DlncError(f"`device` {name!r}: torch sees no GPU on this machine; give cpu")
        if device.index is not None and device.index >= count:
            raise DlncError(f"`device` {name!r}: this machine has {count} GPU(s), cuda:0 to "
                            f"cuda:{count - 1}")  # fmt: skip
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DlncError(f"`device` {name!r}: MPS is not available on this machine; give cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DlncError(f"`device` must be cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def standard_eval(
    model_path: str | os.PathLike,
    text_file: str | os.PathLike | None = None,
    seq_len: int | None = None,
    tasks: Sequence[str] = (),
    options: StandardEvalOptions | None = None,
) -> dict:
    """`{"perplexity": Perplexity.to_dict(), "tasks": {task: {metric: value}},
    "results_file": path}` (each key present when asked for): windows of `seq_len` tokens of
    `text_file`, and the lm-eval `tasks`, on one copy of the model at `model_path`."""
    options = options or StandardEvalOptions()
    if seq_len is not None and text_file is None:
        raise DlncError("`seq_len` needs `data` TEXT_FILE")
    if seq_len is not None and seq_len < 2:
        raise DlncError(f"`seq_len` must be >= 2, got {seq_len}")
    if not tasks and (options.limit, options.num_fewshot, options.output_path) != (None,) * 3:
        raise DlncError("`limit`, `num_fewshot` and `output_path` apply to `tasks`; give `tasks`")
    names, folders = _task_names(tasks)  # task files checked before the model loads
    harness = _import_harness() if names else None
    model = _placed(model_path, options, causal=seq_len is not None)
    if seq_len is not None:
        check_window(model, seq_len)  # before the text is read and tokenized
    rows: dict = {}
    if seq_len is not None:
        rows["perplexity"] = _perplexity(model, model_path, text_file, seq_len, options).to_dict()
    if names:
        rows["tasks"], written = _run_harness(harness, model, model_path, names, folders, options)
        if written is not None:
            rows["results_file"] = str(written)
    return rows


def text_perplexity(
    model_path: str | os.PathLike,
    text_file: str | os.PathLike,
    seq_len: int,
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 1,
    device: str | None = None,
    dtype: str = "auto",
) -> Perplexity:
    """Perplexity of the causal LM at `model_path` on the whole of `text_file`."""
    options = StandardEvalOptions(device, dtype, batch_size, tokenizer)
    model = _placed(model_path, options, causal=True)
    check_window(model, seq_len)  # before the text is read and tokenized
    return _perplexity(model, model_path, text_file, seq_len, options)


def run_tasks(
    model_path: str | os.PathLike,
    tasks: Sequence[str],
    *,
    tokenizer: str | os.PathLike | None = None,
    batch_size: int = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    output_path: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness `tasks` (names, or paths of task YAML files) on the model at
    `model_path`: {task: {metric: value}}; with `output_path`, lm-eval's results JSON too."""
    options = StandardEvalOptions(device, dtype, batch_size, tokenizer, limit, num_fewshot,
                                  output_path)  # fmt: skip
    return standard_eval(model_path, tasks=tasks, options=options)["tasks"]


def _placed(model_path: str | os.PathLike, options: StandardEvalOptions, causal: bool) -> nn.Module:
    """The model at `model_path` on `options.device`, in `options.dtype`, in eval mode."""
    from compressor.workflows.finetune import load_model

    model = load_model(model_path)
    if causal:
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) or not model.can_generate():
            kind = type(model).__name__
            raise DlncError(f"`seq_len`: perplexity needs a causal language model, got {kind}")
    return model.to(device=eval_device(options.device), dtype=DTYPES[options.dtype]).eval()


def _perplexity(model, model_path, text_file, seq_len, options) -> Perplexity:
    from compressor.training.data import load_tokenizer

    tok = load_tokenizer(model_path, options.tokenizer)
    text = Path(text_file).read_text(encoding="utf-8")
    ids = tok(text, return_tensors="pt", verbose=False).input_ids[0]
    return window_perplexity(model, ids, seq_len, options.batch_size)


def _run_harness(harness, model, model_path, names, folders, options) -> tuple[dict, Path | None]:
    """Run the tasks through `simple_evaluate`: their metrics, and the results file written."""
    from compressor.training.data import load_tokenizer

    manager = harness.TaskManager(
        include_path=folders or None, include_defaults=len(folders) < len(names)
    )
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise DlncError(f"`tasks`: unknown task {unknown[0]!r} (lm-eval's names, or a task YAML)")
    lm = harness.HFLM(pretrained=model, tokenizer=load_tokenizer(model_path, options.tokenizer),
                      batch_size=options.batch_size)  # fmt: skip
    tracker = harness.EvaluationTracker()
    try:
        out = harness.simple_evaluate(
            model=lm, model_args={"pretrained": str(model_path), "dtype": options.dtype},
            tasks=names, task_manager=manager, limit=options.harness_limit,
            num_fewshot=options.num_fewshot, device=str(eval_device(options.device)),
            batch_size=options.batch_size, log_samples=False, bootstrap_iters=0,
            evaluation_tracker=tracker,
        )  # fmt: skip
    except (ValueError, KeyError, OSError, FileNotFoundError) as e:
        raise DlncError(f"`tasks` {names}: lm-eval failed ({first_line(e)})") from e
    metrics = {task: _metrics(values) for task, values in out["results"].items()}
    if options.output_path is None:
        return metrics, None
    return metrics, _write_results(out, tracker, Path(options.output_path))


def _write_results(results: dict, tracker, path: Path) -> Path:
    """lm-eval's aggregated results file, laid out and named as its own `--output_path`
    writes it (`EvaluationTracker.save_results_aggregated`): `<stem>_<date>.json` beside a
    `.json` path, else `<folder>/<model name>/results_<date>.json`; written atomically,
    and a failed write is an error, not the warning lm-eval logs."""
    import json
    from dataclasses import asdict

    from lm_eval.utils import handle_non_serializable

    from compressor.io.files import atomic_path

    general = tracker.general_config_tracker
    general.log_end_time()
    body = {**results, "task_hashes": {}, **asdict(general)}
    date_id = datetime.now().isoformat().replace(":", "-")
    if path.suffix == ".json":
        file = path.with_name(f"{path.stem}_{date_id}.json")
    else:
        file = path / str(general.model_name_sanitized) / f"results_{date_id}.json"
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from compressor.io.files import write_error

        raise write_error(file.parent, e) from e
    text = json.dumps(body, indent=2, default=handle_non_serializable, ensure_ascii=False)
    with atomic_path(file) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return file


def _import_harness() -> SimpleNamespace:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise DlncError("`tasks` needs lm-evaluation-harness: pip install 'dlnc[eval]'") from e
    return SimpleNamespace(simple_evaluate=simple_evaluate, HFLM=HFLM, TaskManager=TaskManager,
                           EvaluationTracker=EvaluationTracker)  # fmt: skip


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
