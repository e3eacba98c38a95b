"""The `dlnc` app: each command lives in its own module; this file only wires them up."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import bench, estimate, evaluate, finetune, recipes
from cli.common import register_app
from cli.compress import compress
from cli.demo import demo
from cli.inspect import inspect
from cli.onnx import onnx
from cli.quantize import quantize
from cli.speed import speed

app = typer.Typer(
    name="dlnc",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Low-rank compression of pretrained networks (deep linear network compression).",
)


def _version(value: bool) -> None:
    if value:
        from compressor import __version__

        typer.echo(f"dlnc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Low-rank compression of pretrained networks (deep linear network compression)."""


app.command("demo")(demo)
app.command("compress")(compress)
app.command("inspect")(inspect)
app.command("estimate-ranks")(estimate.estimate_ranks)
app.command("quantize")(quantize)
app.command("finetune")(finetune.finetune)
app.command("eval")(evaluate.evaluate)
app.command("speed")(speed)
app.command("onnx")(onnx)
app.add_typer(recipes.app, name="recipes")
app.add_typer(bench.app, name="bench")
register_app(app)
