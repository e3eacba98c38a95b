"""`dlnc onnx` (compressor/workflows/onnx.py): factorized GPT-2, Llama (grouped-query attention)
and a bare BERT encoder -> ONNX -> onnxruntime, equal to `load_pretrained`'s outputs; the file
holds the factors, not merged weights; bad input is one line and writes nothing.

Each export runs torch.onnx's dynamo exporter (a few seconds a model), so each family is
exported once for the module and the checks share it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from cli_helpers import dlnc, one_line_error
from conftest import build_tiny, save_tiny
from hf_helpers import compressed_export

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {"gpt2": "logits", "llama": "logits", "bert-encoder": "last_hidden_state"}


def _model(family: str):
    if family != "bert-encoder":
        return None
    from transformers import BertModel

    config = build_tiny("bert").config
    torch.manual_seed(0)
    return BertModel(config).eval()  # a sentence encoder: no head


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (its dlnc export folder, its ONNX file, `dlnc onnx --json`'s output), made
    once through the command line."""
    root = tmp_path_factory.mktemp("onnx")
    made = {}

    def make(family: str):
        if family not in made:
            base = family.split("-")[0]
            _, folder = compressed_export(base, root / family, model=_model(family))
            out = root / f"{family}.onnx"
            result = dlnc("onnx", folder, "--out", out, "--json")
            assert result.exit_code == 0, result.output
            made[family] = folder, out, json.loads(result.stdout)
        return made[family]

    return make


def _inputs(session, batch: int = 2, length: int = 20) -> dict[str, np.ndarray]:
    """Another shape than the command traced and checked; right padding on the last row."""
    g = torch.Generator().manual_seed(7)
    names = [i.name for i in session.get_inputs()]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, 15:] = 0
    tensors = {"input_ids": torch.randint(0, 64, (batch, length), generator=g),
               "attention_mask": mask,
               "token_type_ids": (torch.arange(length) >= 10).long().expand(batch, -1)}  # fmt: skip
    return {n: tensors[n].numpy() for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_gives_load_pretrained_outputs(exported, family):
    from compressor.core.surgery import factorized_layers
    from compressor.io.load import load_pretrained

    folder, out, report = exported(family)
    model = load_pretrained(folder)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = _inputs(session)
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        expected = getattr(model(**{k: torch.from_numpy(v) for k, v in feeds.items()}),
                           FAMILIES[family]).numpy()  # fmt: skip
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    # what the command reported: the check it ran, the graph's names and dynamic axes
    scale = max(1.0, float(np.abs(expected).max()))  # the check's shape differs; same model
    assert report["check"]["max_abs_diff"] <= report["check"]["tolerance"] <= 2e-3 * scale
    assert report["output"] == FAMILIES[family] == session.get_outputs()[0].name
    assert report["factorized_layers"] == len(factorized_layers(model)) > 0
    assert report["files"] == [str(out)] and report["bytes"] == out.stat().st_size
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * len(feeds)
    expected_inputs = ["input_ids", "attention_mask"] + ["token_type_ids"] * (
        family == "bert-encoder"
    )
    assert list(feeds) == report["inputs"] == expected_inputs


def _weights(path) -> int:
    """Elements of the ONNX file's initializers (its weights)."""
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def test_the_file_holds_the_factors_not_a_merged_weight(exported, monkeypatch):
    """The dense model's ONNX (written over an old file and a stale `.data` with overwrite,
    and without onnxruntime: a note, no check) is larger by exactly the weights the factors
    save."""
    import compressor.workflows.onnx as workflow
    from compressor.io.checkpoint import load_checkpoint
    from compressor.io.load import load_pretrained

    folder, out, _ = exported("llama")
    dense = folder.parent / "llama-dense"
    dense_out = out.parent / "llama-dense.onnx"
    dense_out.write_text("old")
    (out.parent / "llama-dense.onnx.data").write_text("stale")
    monkeypatch.setattr(workflow, "_import_runtime", lambda: None)
    done = workflow.export_onnx(dense, dense_out, overwrite=True)
    assert done.check is None and any("onnxruntime is not installed" in n for n in done.notices)
    assert done.factorized == 0 and done.files == [dense_out.resolve()]
    assert not (out.parent / "llama-dense.onnx.data").exists()
    assert out.stat().st_size < dense_out.stat().st_size
    params = [sum(p.numel() for p in m.parameters())
              for m in (load_checkpoint(dense).model, load_pretrained(folder))]  # fmt: skip
    assert _weights(dense_out) - _weights(out) == params[0] - params[1] > 0


def test_outputs_that_differ_are_refused_and_nothing_is_written(exported, monkeypatch, tmp_path):
    """A graph that does not compute the model (the factorized file given for the dense
    model) fails the onnxruntime check: one line, no file, no staging folder."""
    import shutil

    import compressor.workflows.onnx as workflow

    folder, out, _ = exported("llama")
    monkeypatch.setattr(workflow._Graph, "export", lambda self, path: shutil.copy(out, path))
    target = tmp_path / "wrong.onnx"
    result = dlnc("onnx", folder.parent / "llama-dense", "--out", target)
    one_line_error(result, "onnxruntime's outputs differ from PyTorch's", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def dense_gpt2(tmp_path_factory):
    return save_tiny("gpt2", tmp_path_factory.mktemp("gpt2") / "gpt2")[1]


@pytest.mark.parametrize(
    "out, needles",
    [
        ("model.txt", ["--out", "ends with .onnx"]),
        ("missing/model.onnx", ["no such folder"]),
        ("exists.onnx", ["already exists; pass --overwrite"]),
        ("INPUT/model.onnx", ["inside the input folder"]),
    ],
)
def test_a_bad_output_is_one_line_before_any_work(dense_gpt2, tmp_path, out, needles):
    (tmp_path / "exists.onnx").write_text("mine")
    target = dense_gpt2 / "model.onnx" if out.startswith("INPUT") else tmp_path / out
    before = sorted(p.name for p in [*tmp_path.iterdir(), *dense_gpt2.iterdir()])
    one_line_error(dlnc("onnx", dense_gpt2, "--out", target), *needles)
    assert sorted(p.name for p in [*tmp_path.iterdir(), *dense_gpt2.iterdir()]) == before
    assert (tmp_path / "exists.onnx").read_text() == "mine"


@pytest.mark.parametrize(
    "family, needle",
    [
        ("vit", "reads `pixel_values`"),
        ("t5", "is an encoder-decoder"),
        ("mlp", "no known architecture (tensor mode); ONNX export needs"),
    ],
)
def test_a_model_the_export_does_not_cover_is_one_line(tmp_path, family, needle):
    _, path = save_tiny(family, tmp_path / family)
    one_line_error(dlnc("onnx", path.parent if family == "mlp" else path, "--out",
                        tmp_path / "m.onnx"), needle)  # fmt: skip
    assert not (tmp_path / "m.onnx").exists()


def test_without_the_exporter_packages_the_error_says_what_to_install(
    dense_gpt2, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` fails
    one_line_error(
        dlnc("onnx", dense_gpt2, "--out", tmp_path / "m.onnx"), "pip install 'dlnc[onnx]'"
    )
    assert list(tmp_path.iterdir()) == []
