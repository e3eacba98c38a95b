"""`dlnc speed`: how fast a model runs (prefill and decode for causal LMs, one forward pass
otherwise), and a dense original beside it, measured alternately in one process."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import fail, human_count, print_json, quiet_libraries, stdout_console, user_errors
from cli.flags import JsonOut


def speed(
    model: Annotated[Path, typer.Argument(help="A dlnc export or a model folder.")],
    against: Annotated[
        Path | None, typer.Option(help="The dense original, timed alternately.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 or mps.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    threads: Annotated[int | None, typer.Option(help="torch's CPU threads.")] = None,
    repeats: Annotated[int, typer.Option(help="Best of this many runs, after a warm-up.")] = 3,
    prefill_batch: Annotated[int, typer.Option(help="Prompts per prefill (forward).")] = 1,
    prompt_len: Annotated[int, typer.Option(help="Tokens per prompt in prefill.")] = 512,
    batch: Annotated[str, typer.Option(help="Decode batch sizes, comma-separated.")] = "1,8",
    context_len: Annotated[int, typer.Option(help="Prompt tokens before decoding.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per sequence.")] = 32,
    compile: Annotated[bool, typer.Option(help="torch.compile each model's forward.")] = False,
    json_out: JsonOut = False,
) -> None:
    """Prefill latency and decode tokens/s (Hugging Face generate, KV cache, greedy) of a
    causal LM, or one forward pass of any other model; with --against, the dense original's
    numbers and the ratios. Best of --repeats after a warm-up; timings are only comparable
    between runs on the same, otherwise idle machine."""
    from compressor.workflows.speed import SpeedOptions, measure_speed

    try:
        batches = tuple(int(b) for b in batch.split(",") if b.strip())
    except ValueError:
        fail(f"--batch {batch!r}: give sizes like 1,8")
    quiet_libraries()
    with user_errors("speed"):
        options = SpeedOptions(
            prefill_batch=prefill_batch, prompt_len=prompt_len, decode_batches=batches,
            context_len=context_len, new_tokens=new_tokens, repeats=repeats, device=device,
            dtype=dtype, threads=threads, compile=compile,
        )  # fmt: skip
        results = measure_speed(model, against, options)
    rows = {label: r.to_dict() for label, r in results.items()}
    if json_out:
        print_json({"options": asdict(options), **rows})
        return
    stdout_console().print(speed_table(rows, options))


def speed_table(rows: dict[str, dict], options: object) -> Table:
    """One row per model; with a dense original, a row of ratios (> 1: the model is faster)."""
    o = options
    table = Table(title=f"speed on {o.device}, {o.dtype}, best of {o.repeats}")
    table.add_column("model")
    table.add_column("params", justify="right")
    lm = rows["model"]["kind"] == "causal_lm"
    if lm:
        table.add_column(f"prefill {o.prefill_batch}x{o.prompt_len} ms", justify="right")
        for b in o.decode_batches:
            table.add_column(f"decode b{b} tok/s", justify="right")
    else:
        table.add_column(f"forward {o.prefill_batch}x{o.prompt_len} ms", justify="right")
    for label, r in rows.items():
        cells = [f"{r['prefill_ms']:.1f}"] if lm else [f"{r['forward_ms']:.1f}"]
        cells += [f"{r['decode_tokens_per_s'][b]:.1f}" for b in o.decode_batches] if lm else []
        table.add_row(label, human_count(r["params"]), *cells)
    if "dense" in rows:
        m, d = rows["model"], rows["dense"]
        if lm:
            cells = [_x(d["prefill_ms"] / m["prefill_ms"])]
            cells += [_x(m["decode_tokens_per_s"][b] / d["decode_tokens_per_s"][b])
                      for b in o.decode_batches]  # fmt: skip
        else:
            cells = [_x(d["forward_ms"] / m["forward_ms"])]
        table.add_row("speed-up", f"{m['params'] / d['params']:.3f}", *cells)
    return table


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"
