"""A model folder (a dlnc export, factors and all, or a dense checkpoint) -> one ONNX file, the
serving path that keeps the savings: the factorized layers stay two small matrix products in
the graph, so ONNX Runtime reads and runs the factors, not a merged weight.

    done = export_onnx("my-lm-dlnc", "my-lm.onnx")   # torch.onnx's dynamo exporter
    done.check.max_abs_diff                          # onnxruntime against PyTorch, or None

The graph is the forward pass without a KV cache: `input_ids` and `attention_mask` (and
`token_type_ids` for a model with token types) of any batch size and length in, `logits` out
for a model with a head, `last_hidden_state` for a bare encoder; float32, onnxruntime's CPU
type. Everything is checked before the export; the file is written beside its destination and
renamed into place once onnxruntime (when installed) has matched PyTorch's outputs on a sample
of another shape than the one traced, so the dynamic axes are checked too.
"""

from __future__ import annotations

import inspect
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.core.inputs import input_limits
from compressor.core.progress import ProgressFn
from compressor.core.tasks import task_of
from compressor.errors import DlncError, first_line
from compressor.io.files import check_writable, write_error

__all__ = ["OnnxCheck", "OnnxExport", "check_onnx_output", "export_onnx"]

TRACE_SHAPE = (2, 8)  # (batch, sequence) of the traced example: over 1, so both stay dynamic
CHECK_SHAPE = (3, 13)  # the sample onnxruntime is checked on: another shape than the traced
# The largest |onnxruntime - PyTorch|, relative to the outputs' largest magnitude. Two float32
# runtimes each differ from the exact result by the model's own rounding error, which a
# calibrated export can amplify: SmolLM2 at keep 0.8 (error-corrected) differs from its float64
# self by 1.4e-3 in PyTorch (4e-5 of its logits' range; keep 0.5 and dense 1-2e-4), and
# onnxruntime from PyTorch by 5.2e-3 (1.5e-4). A wrong graph differs by whole units.
TOLERANCE = 1e-3
INSTALL = "pip install 'dlnc[onnx]'"


@dataclass
class OnnxCheck:
    """onnxruntime's outputs against PyTorch's on one sample."""

    max_abs_diff: float  # largest |onnxruntime - PyTorch| over the sample's outputs
    tolerance: float  # the largest allowed: TOLERANCE x max(1, the outputs' largest magnitude)
    shape: tuple[int, int]  # (batch, sequence) of the sample

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "shape": list(self.shape)}  # fmt: skip


@dataclass
class OnnxExport:
    """What `export_onnx` wrote."""

    path: Path  # the .onnx file
    files: list[Path]  # it, and its external weights (`<name>.data`) for a model over 2 GB
    bytes: int  # their size on disk
    inputs: list[str]  # the graph's inputs, each (batch, sequence)
    output: str  # `logits` or `last_hidden_state`
    factorized: int  # factorized layers in the model (0: a dense model)
    check: OnnxCheck | None  # None: not checked (onnxruntime not installed, or `check` off)
    notices: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path), "files": [str(f) for f in self.files], "bytes": self.bytes,
            "inputs": self.inputs, "output": self.output, "factorized_layers": self.factorized,
            "check": self.check.to_dict() if self.check else None, "notices": self.notices,
        }  # fmt: skip


def check_onnx_output(out: str | os.PathLike, model_path: str | os.PathLike, overwrite: bool):
    """Before any work: `out` is a `.onnx` file name outside the input folder, not there yet
    (with its `.data` file) unless `overwrite`, in a folder that exists and can be written."""
    out, source = Path(out).resolve(), Path(model_path).resolve()
    if out.suffix != ".onnx":
        raise DlncError(f"`out` {out}: an ONNX file name ends with .onnx")
    if source == out or source in out.parents:
        raise DlncError(
            f"`out` {out}: inside the input folder {source}, which dlnc never writes to; "
            "pick an output outside it"
        )
    if not out.parent.is_dir():
        raise DlncError(f"`out` {out}: no such folder {out.parent}")
    for path in (out, _data_file(out)):
        if path.is_dir():
            raise DlncError(f"`out` {path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise DlncError(f"{path} already exists; pass `overwrite` to replace it")
    check_writable(out)


def export_onnx(
    model_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    check: bool = True,
    progress: ProgressFn | None = None,
) -> OnnxExport:
    """Write the model at `model_path` (a dlnc export or a dense checkpoint folder) to the
    ONNX file `out`, checked against onnxruntime when `check` and onnxruntime is installed."""
    from compressor.core.surgery import factorized_layers

    step = progress or (lambda *a, **k: None)
    check_onnx_output(out, model_path, overwrite)
    _import_exporter()
    runtime = _import_runtime() if check else None
    step("onnx", 0, 3)
    model, notices = _float32(_load(Path(model_path)))
    graph = _Graph.of(model, model_path)
    if check and runtime is None:
        notices.append(f"onnxruntime is not installed: the ONNX file was not checked ({INSTALL})")
    step("onnx", 1, 3)
    out = Path(out).resolve()
    with _staging(out) as staged:
        graph.export(staged)
        step("onnx", 2, 3)
        result = graph.compare(staged, runtime) if runtime is not None else None
        if result is not None and not result.max_abs_diff <= result.tolerance:
            raise DlncError(
                f"{out}: onnxruntime's outputs differ from PyTorch's by {result.max_abs_diff:.3g}"
                f" (tolerance {result.tolerance:.3g}); nothing was written"
            )
        files = _place(staged, out)
    step("onnx", 3, 3)
    return OnnxExport(out, files, sum(f.stat().st_size for f in files), list(graph.inputs),
                      graph.output, len(factorized_layers(model)), result, notices)  # fmt: skip


class _Graph(nn.Module):
    """The model's forward pass as the ONNX graph sees it: named token tensors in, one
    output tensor out, no cache."""

    def __init__(self, model: nn.Module, inputs: tuple[str, ...], output: str, vocab: int):
        super().__init__()
        self.model, self.inputs, self.output, self.vocab = model, inputs, output, vocab
        self.extra = (
            {"use_cache": False} if output == "logits" and _takes(model, "use_cache") else {}
        )

    @classmethod
    def of(cls, model: nn.Module, where: str | os.PathLike) -> _Graph:
        """The graph of `model` (loaded from `where`), or a `DlncError` for a model the
        export does not cover: one without an architecture, not reading token ids, or an
        encoder-decoder."""
        name = type(model).__name__
        if getattr(model, "config", None) is None:
            raise DlncError(f"{where}: no known architecture (tensor mode); ONNX export needs "
                            "a transformers model")  # fmt: skip
        limits = input_limits(model)
        if limits.main_input != "input_ids" or limits.vocab is None:
            raise DlncError(f"{where}: {name} reads `{limits.main_input}`; `dlnc onnx` exports "
                            "models that read token ids (input_ids)")  # fmt: skip
        task = task_of(model)
        if task == "seq2seq_lm":
            raise DlncError(f"{where}: {name} is an encoder-decoder; `dlnc onnx` exports "
                            "decoders and encoders")  # fmt: skip
        if limits.positions is not None and limits.positions < CHECK_SHAPE[1]:
            raise DlncError(f"{where}: {name} covers {limits.positions} positions; the ONNX "
                            f"check needs {CHECK_SHAPE[1]}")  # fmt: skip
        inputs = ["input_ids", "attention_mask"]
        if getattr(model.config, "type_vocab_size", 0) > 1 and _takes(model, "token_type_ids"):
            inputs.append("token_type_ids")
        output = "last_hidden_state" if task is None else "logits"
        return cls(model, tuple(n for n in inputs if _takes(model, n)), output, limits.vocab)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        tensors = {n: t for n, t in given.items() if t is not None}
        return getattr(self.model(input_ids=input_ids, **tensors, **self.extra), self.output)

    def sample(self, shape: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
        """Seeded inputs of `shape`: token ids, a mask with the last row padded on the right
        (the padding a tokenizer adds), token types 0 then 1."""
        g = torch.Generator().manual_seed(seed)
        length = shape[1]
        tensors = {"input_ids": torch.randint(0, self.vocab, shape, generator=g),
                   "attention_mask": torch.ones(shape, dtype=torch.long),
                   "token_type_ids": torch.zeros(shape, dtype=torch.long)}  # fmt: skip
        tensors["attention_mask"][-1, length // 2 :] = 0
        tensors["token_type_ids"][:, length // 2 :] = 1
        return {n: tensors[n] for n in self.inputs}

    def export(self, path: Path) -> None:
        """torch.onnx's dynamo exporter: every input (batch, sequence), both dynamic."""
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        example = self.sample(TRACE_SHAPE, seed=0)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            try:
                program = torch.onnx.export(
                    self, (), kwargs=example, dynamo=True, verbose=False, report=False,
                    input_names=list(self.inputs), output_names=[self.output],
                    dynamic_shapes={n: {0: batch, 1: sequence} for n in self.inputs},
                )  # fmt: skip
            except Exception as e:  # the exporter's many error types: one line, not a trace
                name = type(self.model).__name__
                raise DlncError(f"torch.onnx could not export {name}: {first_line(e)}") from e
            try:
                program.save(str(path))
            except OSError as e:
                raise write_error(path, e) from e

    def compare(self, path: Path, runtime) -> OnnxCheck:
        """onnxruntime (CPU) on the ONNX file at `path` against this forward pass, on a
        sample of `CHECK_SHAPE`."""
        sample = self.sample(CHECK_SHAPE, seed=1)
        with torch.no_grad():
            expected = self(**sample).numpy()
        session = runtime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run([self.output], {n: t.numpy() for n, t in sample.items()})[0]
        diff = float(abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        scale = max(1.0, float(abs(expected).max()))
        return OnnxCheck(diff, TOLERANCE * scale, CHECK_SHAPE)


def _load(folder: Path) -> nn.Module:
    """A dlnc export (its factorized layers) or a checkpoint folder; `_Graph.of` refuses a
    model without an architecture (tensor mode)."""
    from compressor.io.checkpoint import load_checkpoint
    from compressor.io.load import load_pretrained
    from compressor.io.section import is_export

    if is_export(folder):
        return load_pretrained(folder)
    loaded = load_checkpoint(folder)
    return loaded.model if not loaded.tensor_mode else nn.Module()


def _takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _float32(model: nn.Module) -> tuple[nn.Module, list[str]]:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    notices = []
    if dtypes - {torch.float32}:
        kinds = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        notices.append(f"the weights ({kinds}) are written as float32, onnxruntime's CPU type")
        nn.Module.float(model)  # transformers refuses `.float()` on a quantized (dlnc) model
    return model.eval(), notices


def _data_file(out: Path) -> Path:
    """Where the exporter puts the weights of a model over 2 GB: `<name>.data` beside it."""
    return out.with_name(out.name + ".data")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A path under its final name (the external-data file is named after it) in a hidden
    folder beside `out`, removed afterwards whatever happens."""
    folder = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir()
    except OSError as e:
        raise write_error(folder, e) from e
    try:
        yield folder / out.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _place(staged: Path, out: Path) -> list[Path]:
    """Move the staged file (and its `.data`) into place: the weights first, the .onnx last,
    so a complete `out` appears at once; a stale `.data` of a replaced file goes."""
    data, final_data = _data_file(staged), _data_file(out)
    try:
        if data.exists():
            os.replace(data, final_data)
        elif final_data.exists():
            final_data.unlink()
        os.replace(staged, out)
    except OSError as e:
        raise write_error(out, e) from e
    return [out, *([final_data] if final_data.exists() else [])]


def _import_exporter() -> None:
    """torch.onnx's dynamo exporter needs onnx and onnxscript: a one-line error without."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise DlncError(f"ONNX export needs onnx and onnxscript: {INSTALL}") from e


def _import_runtime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime
