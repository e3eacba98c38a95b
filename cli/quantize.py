"""`dlnc quantize`: an export (or a checkpoint) in, its weights as int8 or int4 codes out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    human_bytes,
    print_json,
    print_notes,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.compress import RecipeSpec
from cli.flags import (
    CALIBRATION_DATA,
    DATA,
    EXPORT,
    LOAD,
    METHOD,
    RECIPE_FLAGS,
    TARGETS,
    JsonOut,
    LogEvery,
    Quiet,
    recipe_given,
    with_flags,
)

Out = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Output folder \\[default: <input>-int4 (or -int8) beside it]."
    ),
]


@with_flags(
    TARGETS,
    LOAD,
    EXPORT.only("quantize", "group_size", "overwrite", "max_shard_size").defaults(quantize="int4"),
    METHOD.only("generate"),
    DATA,
)
def quantize(
    model: Annotated[Path, typer.Argument(help="A dlnc export, or a model folder.")],
    out: Out = None,
    recipe: RecipeSpec = "auto",
    data: CALIBRATION_DATA = None,
    json_out: JsonOut = False,
    log_every: LogEvery = 10,
    quiet: Quiet = False,
    *,
    targets: dict,
    load: dict,
    export: dict,
    rank_method: dict,
    batches: dict,
) -> None:
    """Store the weights of a dlnc export (its factors, and the layers its recipe targets that
    stayed dense) or of a checkpoint's targeted layers as integer codes: GPTQ on --data (or on
    text a causal LM generates itself, or random word pieces for a text encoder), else rounded
    to nearest."""
    from compressor.options import ExportOptions, LoadOptions
    from compressor.workflows.options import recipe_options
    from compressor.workflows.quantize import quantize_checkpoint

    quiet_libraries()
    with user_errors("quantize"):
        options, _ = recipe_options(
            recipe, model, recipe_given(**targets), RECIPE_FLAGS, load=LoadOptions(**load),
            method=rank_method, data={"path": data, **batches}, export=ExportOptions(**export),
        )  # fmt: skip
        with progress_bars(not (json_out or quiet), log_every) as progress:
            result = quantize_checkpoint(model, out, options, progress)
    if json_out:
        print_json({"out_dir": str(result.out_dir), **result.report})
        return
    console = stdout_console()
    if not quiet:
        print_notes(result.notices, "quantize", console)
    console.print(quantize_table(result.report))
    console.print(f"wrote {result.out_dir}")


def quantize_table(report: dict) -> Table:
    """What was quantized, how, and the bytes and perplexity before and after."""
    q = report["quantization"]
    group = "a row" if q["group_size"] == 0 else str(q["group_size"])
    table = Table(title=f"dlnc quantize (int{q['bits']}, groups of {group}, {q['rounding']})")
    for col in ("", "before", "after", "after / before"):
        table.add_column(col, justify="right")
    table.add_row("layers quantized", "", str(q["layers"]), "")
    table.add_row("bits a weight (those layers)", "", f"{q['bits_per_weight']:.2f}", "")
    b0, b1 = report["bytes_before"], report["bytes_after"]
    table.add_row("bytes on disk", human_bytes(b0), human_bytes(b1), f"{b1 / b0:.3f}")
    ppl = report.get("perplexity")
    if ppl and "after_quantize" in ppl:
        before, after = ppl["before"], ppl["after_quantize"]
        table.add_row("perplexity", f"{before:.2f}", f"{after:.2f}", f"{after / before:.3f}")
    return table
