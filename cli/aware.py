"""The data-aware options shared by `dlnc compress` and `dlnc estimate-ranks`: one place for
their names, help texts and the conversion to `AwareOptions`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

METHOD_NAMES = ("svd", "spectrum", "whiten", "dynamics")  # spectrum: an alias of svd

Method = Annotated[
    str | None,
    typer.Option(
        help="Rank method: svd (data-free), whiten (activation-aware, needs --data), dynamics "
        "(needs --reference, or --warmup-steps with --data). \\[default: whiten with --data, "
        "dynamics with --reference, else svd]"
    ),
]
Data = Annotated[
    Path | None,
    typer.Option(
        help="Calibration data: a text file (a sample per line, or blank-line separated), "
        "JSONL, a save_to_disk folder, or a .safetensors file of input tensors."
    ),
]
TextField = Annotated[str, typer.Option(help="JSONL / dataset field holding the text.")]
LabelField = Annotated[str | None, typer.Option(help="Field holding a label (classification).")]
Tokenizer = Annotated[
    Path | None, typer.Option(help="Tokenizer folder \\[default: the model's folder].")
]
MaxLength = Annotated[int, typer.Option(help="Tokens per sample (longer ones are truncated).")]
Samples = Annotated[int | None, typer.Option(help="Use at most N samples (a seeded subset).")]
Seed = Annotated[int, typer.Option(help="Seed of the subset and the warm-up run.")]
BatchSize = Annotated[int, typer.Option(help="Samples per forward pass.")]
Reference = Annotated[
    Path | None,
    typer.Option(help="The checkpoint this model was trained or fine-tuned from (dynamics)."),
]
WarmupSteps = Annotated[
    int, typer.Option(help="Dynamics: train a copy K steps on --data with the model's objective.")
]
WarmupLr = Annotated[float, typer.Option(help="Learning rate of the warm-up run (AdamW).")]


def aware_options(
    method: str | None,
    data: Path | None,
    text_field: str,
    label_field: str | None,
    tokenizer: Path | None,
    max_length: int,
    samples: int | None,
    seed: int,
    batch_size: int,
    reference: Path | None,
    warmup_steps: int,
    warmup_lr: float,
):
    """`AwareOptions` from the command line; a `DlncError` for a bad combination."""
    from compressor.errors import DlncError
    from compressor.training.data import DataOptions
    from compressor.workflows.plan import AwareOptions

    if method is not None and method not in METHOD_NAMES:
        raise DlncError(f"--method must be one of {', '.join(METHOD_NAMES)}, got {method!r}")
    if method is None:
        method = "dynamics" if (reference or warmup_steps) else "whiten" if data else "svd"
    data_options = None
    if data is not None:
        data_options = DataOptions(
            data, text_field, label_field, tokenizer, max_length, samples, seed, batch_size
        )
    return AwareOptions(
        method="svd" if method == "spectrum" else method,
        data=data_options,
        reference=reference,
        warmup_steps=warmup_steps,
        warmup_lr=warmup_lr,
    )


def apply_ranks_file(options, path: Path) -> None:
    """`--ranks FILE`: its ranks override the policy's, its `dense` layers are left alone."""
    from dataclasses import replace

    from compressor.io.rankfile import load_ranks, split_ranks

    overrides, dense = split_ranks(load_ranks(path))
    options.policy = replace(options.policy, overrides={**options.policy.overrides, **overrides})
    options.exclude = [*options.exclude, *dense]
    options.origins = {**options.origins, "overrides": f"--ranks {path}"}
    if dense:
        options.origins["exclude"] = f"--exclude / --ranks {path}"
