"""`dlnc onnx`: a model folder (a dlnc export, factors and all) as one ONNX file for ONNX
Runtime, checked against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    human_bytes,
    print_json,
    print_notes,
    progress_bars,
    quiet_libraries,
    stdout_console,
    user_errors,
)
from cli.flags import JsonOut


def onnx(
    model: Annotated[
        Path,
        typer.Argument(file_okay=False, help="A dlnc export or a model folder."),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The .onnx file \\[default: <model>.onnx beside it]."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing ONNX file.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            help="Run the written file in onnxruntime (when installed) on a sample and "
            "compare with PyTorch; refuse to write it if they differ."
        ),
    ] = True,
    json_out: JsonOut = False,
) -> None:
    """Export a model to ONNX, its factorized layers kept as factors (the file stays small).

    The graph is the forward pass without a KV cache: input_ids and attention_mask (and
    token_type_ids where the model has token types), batch and sequence length dynamic;
    logits out, or last_hidden_state for an encoder without a head; float32. Needs
    `pip install 'dlnc[onnx]'` (onnx, onnxscript, onnxruntime).
    """
    from compressor.workflows.onnx import export_onnx

    quiet_libraries()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # its notes on missing torchvision
    out = out or model.resolve().parent / f"{model.resolve().name}.onnx"
    with user_errors("onnx"), progress_bars(not json_out) as progress:
        done = export_onnx(model, out, overwrite=overwrite, check=check, progress=progress)
    if json_out:
        print_notes(done.notices, "onnx")  # on stderr: stdout is the JSON
        print_json(done.to_dict())
        return
    console = stdout_console()
    print_notes(done.notices, "onnx", console)
    kind = f"{done.factorized} factorized layers" if done.factorized else "a dense model"
    console.print(f"wrote {done.path} ({human_bytes(done.bytes)}, {kind})", soft_wrap=True)
    console.print(f"inputs {', '.join(done.inputs)} (batch, sequence) -> {done.output}")
    if done.check is not None:
        c = done.check
        console.print(
            f"onnxruntime matches PyTorch: max abs diff {c.max_abs_diff:.2g} on "
            f"{c.shape[0]} x {c.shape[1]} tokens (tolerance {c.tolerance:.2g})"
        )
