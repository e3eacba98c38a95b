"""The data-aware options shared by `dlnc compress` and `dlnc estimate-ranks`: one place for
their names, help texts and the conversion to `AwareOptions`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Method = Annotated[
    str | None,
    typer.Option(
        help="Rank method: svd (data-free), whiten (activation-aware, needs --data), dynamics "
        "(needs --reference, or --warmup-steps with --data), or auto. \\[default: the recipe's; "
        "auto: whiten with --data, dynamics with --reference, else svd]"
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


Generate = Annotated[
    bool,
    typer.Option(
        help="Without --data: a causal language model calibrates on 32 x 256 tokens of text it "
        "generates itself (seeded, cached; about a minute on a CPU for 135M parameters). "
        "--no-generate: ranks and factors from the weights alone."
    ),
]


OutputAware = Annotated[
    bool,
    typer.Option(
        help="With --data: share --keep by each layer's measured effect on the model's output "
        "(one backward pass per batch). --no-output-aware: by each layer's own spectrum."
    ),
]


Correct = Annotated[
    bool,
    typer.Option(
        help="With --data: refit each layer's factors block by block on the inputs the "
        "compressed layers before it produce (error-correcting calibration; a layer with "
        "under 16 calibration tokens per input feature keeps its one-shot factors)."
    ),
]


def aware_options(
    recipe,
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
    output_aware: bool = True,
    correct: bool = True,
    generate: bool = False,
):
    """`AwareOptions` from the command line (through `compressor.workflows.options`)."""
    from compressor.training.data import DataOptions
    from compressor.workflows.options import aware_options as build

    data_options = None
    if data is not None:
        data_options = DataOptions(
            data, text_field, label_field, tokenizer, max_length, samples, seed, batch_size
        )
    return build(
        recipe, method, data_options,
        reference=reference, warmup_steps=warmup_steps, warmup_lr=warmup_lr,
        output_aware=output_aware, correct=correct, generate=generate,
    )  # fmt: skip
