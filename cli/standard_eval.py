"""`dlnc eval MODEL --seq-len N --data TEXT` and `dlnc eval MODEL --tasks ...`: the numbers
papers report (windowed perplexity; lm-evaluation-harness tasks)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from cli.common import fail, print_json, quiet_libraries, user_errors


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
    """Perplexity with --seq-len (on --data, a text file) and/or lm-eval --tasks (a,b,...)."""
    from compressor.workflows.standard_eval import run_tasks, text_perplexity

    quiet_libraries()
    rows: dict = {}
    with user_errors():
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
