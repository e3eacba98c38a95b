"""`dlnc eval`: held-out metrics of a model; with --seq-len or --tasks, the numbers papers
report (windowed perplexity; lm-evaluation-harness tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    fail,
    is_main_process,
    print_json,
    print_notes,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.flags import DATA, FlagGroup, JsonOut, Quiet, with_flags

EvalData = Annotated[
    Path | None, typer.Option("--data", exists=True, help="Held-out data (text for --seq-len).")
]


STANDARD = FlagGroup("standard", {
    "device": (Annotated[str | None, typer.Option(
        help="--seq-len/--tasks: run on this device (cpu, cuda, cuda:N, mps). "
        "\\[default: GPU if any]")], None),
    "dtype": (Annotated[str, typer.Option(
        help="--seq-len/--tasks: auto (as stored) | float32 | bfloat16 | float16.")], "auto"),
    "num_fewshot": (Annotated[int | None, typer.Option(
        help="lm-eval: few-shot examples per task \\[default: each task's own].")], None),
    "limit": (Annotated[float | None, typer.Option(
        help="lm-eval: at most this many docs per task (< 1: a fraction).")], None),
    "output_path": (Annotated[Path | None, typer.Option(
        help="lm-eval: write its results JSON here (a folder, or a .json file), laid out as "
        "lm_eval --output_path writes it.")], None),
})  # fmt: skip
"""`--seq-len` and `--tasks`: where they run, and lm-eval's own flags."""


@with_flags(DATA.defaults(samples=None), STANDARD)
def evaluate(
    model: Annotated[Path, typer.Argument(help="A dlnc export or an ordinary model folder.")],
    data: EvalData = None,
    teacher: Annotated[
        Path | None, typer.Option(help="The original model, to compare with.")
    ] = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
    seq_len: Annotated[
        int | None, typer.Option(help="Papers' perplexity: windows of this many tokens of --data.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="lm-eval tasks, comma-separated (names or task YAMLs).")
    ] = None,
    *,
    batches: dict,
    standard: dict,
) -> None:
    """Held-out loss of a model (perplexity for LMs, accuracy for classifiers).

    With --teacher, also the original's numbers and the distance from it (distillation loss;
    embedding cosine for encoders). With --seq-len, perplexity as papers report it (the whole
    --data text in non-overlapping windows); with --tasks, lm-evaluation-harness tasks, on
    --device in --dtype (lm-eval's --num-fewshot, --limit and --output-path apply).
    """
    if seq_len is not None or tasks:
        standard_eval(model, data, seq_len, tasks, batches, standard, json_out)
        return
    given = [n for n, v in standard.items() if v not in (None, "auto")]
    if given:
        fail(f"--{given[0].replace('_', '-')} applies to --seq-len and --tasks")
    if data is None:
        fail("--data is needed (or --seq-len with --data, or --tasks)")
    from compressor.training.data import DataOptions
    from compressor.workflows.evaluate import evaluate_checkpoint

    quiet_libraries()
    notices: list[str] = []
    with user_errors("eval"):
        metrics = evaluate_checkpoint(model, DataOptions(data, **batches), teacher, notices)
    if not is_main_process():
        return
    rows = {k: v.to_dict() for k, v in metrics.items()}
    if json_out:
        print_notes([] if quiet else notices, "eval")  # on stderr: stdout is the JSON
        print_json(rows)
        return
    console = stdout_console()
    print_notes([] if quiet else notices, "eval", console)
    console.print(eval_table(rows))


def eval_table(rows: dict[str, dict]) -> Table:
    """One row per model (original / before / after): the metrics that apply."""
    names = ("loss", "perplexity", "accuracy", "distill", "cosine")
    shown = [n for n in names if any(r.get(n) is not None for r in rows.values())]
    table = Table(title="held-out evaluation")
    table.add_column("model")
    for name in shown:
        table.add_column(name, justify="right")
    table.add_column("samples", justify="right")
    for label, r in rows.items():
        cells = ["-" if r.get(n) is None else f"{r[n]:.4g}" for n in shown]
        table.add_row(label, *cells, str(r["samples"]))
    return table


def standard_eval(
    model: Path,
    data: Path | None,
    seq_len: int | None,
    tasks: str | None,
    batches: dict,
    standard: dict,
    json_out: bool,
) -> None:
    """Perplexity with --seq-len (on --data, a text file) and/or lm-eval --tasks (a,b,...):
    the numbers papers report (windowed perplexity; lm-evaluation-harness tasks)."""
    from compressor.workflows.standard_eval import StandardEvalOptions
    from compressor.workflows.standard_eval import standard_eval as run

    quiet_libraries()
    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    with user_errors("eval"):
        options = StandardEvalOptions(
            **standard, batch_size=batches["batch_size"], tokenizer=batches["tokenizer"]
        )
        rows = run(model, data, seq_len, names, options)
    if json_out:
        print_json(rows)
        return
    console = stdout_console()
    if "perplexity" in rows:
        ppl = rows["perplexity"]
        console.print(f"perplexity {ppl['perplexity']:.4f} over {ppl['windows']} windows")
        console.print(f"protocol: {ppl['protocol']}")
    if "tasks" in rows:
        console.print(_task_table(rows["tasks"]))
    if "results_file" in rows:
        console.print(f"wrote {rows['results_file']}", soft_wrap=True)


def _task_table(results: dict[str, dict[str, float]]) -> Table:
    table = Table(title="lm-evaluation-harness")
    for name in ("task", "metric", "value"):
        table.add_column(name, justify="left" if name != "value" else "right")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    return table
