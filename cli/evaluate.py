"""`dlnc eval`: held-out metrics of a model; with --seq-len or --tasks, the numbers papers
report (windowed perplexity; lm-evaluation-harness tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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
from cli.flags import DATA, JsonOut, with_flags

EvalData = Annotated[
    Path | None, typer.Option("--data", exists=True, help="Held-out data (text for --seq-len).")
]


@with_flags(DATA.defaults(samples=None))
def evaluate(
    model: Annotated[Path, typer.Argument(help="A dlnc export or an ordinary model folder.")],
    data: EvalData = None,
    teacher: Annotated[
        Path | None, typer.Option(exists=True, help="The original model, to compare with.")
    ] = None,
    json_out: JsonOut = False,
    seq_len: Annotated[
        int | None, typer.Option(help="Papers' perplexity: windows of this many tokens of --data.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="lm-eval tasks, comma-separated (names or task YAMLs).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="lm-eval: at most this many docs.")] = None,
    *,
    batches: dict,
) -> None:
    """Held-out loss of a model (perplexity for LMs, accuracy for classifiers).

    With --teacher, also the original's numbers and the distance from it (distillation loss;
    embedding cosine for encoders). With --seq-len, perplexity as papers report it (the whole
    --data text in non-overlapping windows); with --tasks, lm-evaluation-harness tasks.
    """
    if seq_len is not None or tasks:
        standard_eval(model, data, seq_len, tasks, limit, batches["batch_size"],
                      batches["tokenizer"], json_out)  # fmt: skip
        return
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
        print_notes(notices, "eval")  # on stderr: stdout is the JSON
        print_json(rows)
        return
    console = stdout_console()
    print_notes(notices, "eval", console)
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
    limit: int | None,
    batch_size: int,
    tokenizer: Path | None,
    json_out: bool,
) -> None:
    """Perplexity with --seq-len (on --data, a text file) and/or lm-eval --tasks (a,b,...):
    the numbers papers report (windowed perplexity; lm-evaluation-harness tasks)."""
    from compressor.workflows.standard_eval import run_tasks, text_perplexity

    quiet_libraries()
    rows: dict = {}
    with user_errors("eval"):
        if seq_len is not None:
            if data is None:
                fail("--seq-len needs --data TEXT_FILE")
            rows["perplexity"] = text_perplexity(
                model, data, seq_len, tokenizer=tokenizer, batch_size=batch_size
            ).to_dict()
        if tasks:
            names = [t.strip() for t in tasks.split(",") if t.strip()]
            rows["tasks"] = run_tasks(
                model, names, tokenizer=tokenizer, batch_size=batch_size, limit=limit
            )
    if json_out:
        print_json(rows)
        return
    console = Console()
    if "perplexity" in rows:
        ppl = rows["perplexity"]
        console.print(f"perplexity {ppl['perplexity']:.4f} over {ppl['windows']} windows")
        console.print(f"protocol: {ppl['protocol']}")
    if "tasks" in rows:
        console.print(_task_table(rows["tasks"]))


def _task_table(results: dict[str, dict[str, float]]) -> Table:
    table = Table(title="lm-evaluation-harness")
    for name in ("task", "metric", "value"):
        table.add_column(name, justify="left" if name != "value" else "right")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            table.add_row(task, metric, f"{value:.4f}")
    return table
