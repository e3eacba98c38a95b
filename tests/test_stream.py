"""Streaming compression: one tensor at a time, the same export as the in-memory path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, example_inputs, outputs
from safetensors import safe_open

from compressor import methods
from compressor.core.ranks import RankPolicy
from compressor.errors import DlncError
from compressor.io import streaming
from compressor.io.load import load_pretrained
from compressor.io.streaming import TensorSource, write_safetensors
from compressor.methods.registry import unregister
from compressor.options import (
    CompressOptions,
    ExportOptions,
    LoadOptions,
    MethodOptions,
    RunOptions,
)
from compressor.workflows.compress import compress_checkpoint
from compressor.workflows.plan import HELD_OUT


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def sharded(family: str, tmp_path: Path, dtype=torch.float32) -> Path:
    model = build_tiny(family).to(dtype)
    folder = tmp_path / f"{family}-src"
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def both(src: Path, tmp_path: Path, format: str = "factors", **kw) -> tuple[Path, Path]:
    """The in-memory and the streamed export (`kw`: `solver`, exact unless given, and
    `large_from` go to `RunOptions`, the rest to `CompressOptions`)."""
    runs = []
    run = {"solver": "exact", **{k: kw.pop(k) for k in ("solver", "large_from") if k in kw}}
    export = ExportOptions(format, max_shard_size="30KB")
    for stream in (False, True):
        opts = CompressOptions(run=RunOptions(stream=stream, **run), export=export, **kw)
        runs.append(compress_checkpoint(src, tmp_path / f"out-{stream}", opts).out_dir)
    return runs[0], runs[1]


def same_files(memory: Path, streamed: Path) -> None:
    """Same tensors bit for bit, same shards, same config.json and report.json."""
    a, b = tensors(memory), tensors(streamed)
    assert list(a) and sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key
    assert sorted(p.name for p in memory.iterdir()) == sorted(p.name for p in streamed.iterdir())
    for name in ("config.json", "model.safetensors.index.json"):
        if (memory / name).exists():
            assert json.loads((memory / name).read_text()) == json.loads(
                (streamed / name).read_text()
            )
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (memory, streamed))
    ra.pop("perplexity", None)  # measured in memory only: a streamed model is never whole
    assert ra == rb


@pytest.mark.parametrize(
    ("family", "dtype", "kw"),
    [
        ("llama", torch.bfloat16, {}),
        ("gpt2", torch.float32, {}),  # Conv1D layout, tied LM head
        ("bert", torch.float32, {"format": "dense"}),
        ("llama", torch.float32, {"policy": RankPolicy(energy=0.8)}),
        # its file keeps the names transformers renamed since (encoder.layer.0.attention.
        # attention.query, now layers.0.attention.q_proj): streaming it used to be refused
        ("vit", torch.float32, {}),
    ],
)
def test_streamed_export_is_the_in_memory_export_bit_for_bit(
    family, dtype, kw, tmp_path, monkeypatch, one_torch_thread
):
    # solver="exact": the streamed path runs the in-memory path's own decomposition, and the
    # rest is copying (in pieces of a few rows here), so every tensor must be equal, not
    # merely close.
    monkeypatch.setattr(streaming, "PIECE_BYTES", 1000)
    memory, streamed = both(sharded(family, tmp_path, dtype), tmp_path, **kw)
    same_files(memory, streamed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_auto_solver_runs_alike_in_memory_and_streamed(family, tmp_path, one_torch_thread):
    # both paths decompose through one solver: with the tiny layers counted as large
    # (`large_from`), the float32 Gram route, its kept reductions and its optimum check run
    # in memory too, and the exports are equal bit for bit
    memory, streamed = both(sharded(family, tmp_path), tmp_path, solver="auto", large_from=16)
    same_files(memory, streamed)
    report = json.loads((memory / "report.json").read_text())
    assert any(r["rank"] is not None for r in report["layers"])


class _TopRows(methods.RankMethod):
    """A toy data-free method registered in this file only: ranks from W's sorted row norms,
    factors that keep the largest rows."""

    name = "toprows"
    column = "toprows"
    priority = -1

    def spectra(self, weights, inputs, progress):
        return {n: w.norm(dim=1).sort(descending=True).values for n, w in weights.tensors.items()}

    def factor_fn(self, weights, inputs, spectra):
        def factor(name, module, rank):
            w = weights.tensors[name]
            top = w.norm(dim=1).argsort(descending=True)[:rank]
            up = torch.zeros(w.shape[0], rank, dtype=w.dtype)
            up[top, torch.arange(rank)] = 1.0
            kept = w[top].clone()
            return up, kept, float((w - up @ kept).norm() / w.norm())

        return factor

    def reading(self, name, spectrum, weights, inputs, tau):
        return 1


def test_a_registered_data_free_method_streams(tmp_path, one_torch_thread):
    # a method registered in one file streams: the streamed export is the in-memory one
    methods.register(_TopRows())
    try:
        aware = MethodOptions(method="toprows")
        memory, streamed = both(sharded("llama", tmp_path), tmp_path, method=aware)
        same_files(memory, streamed)
        report = json.loads((streamed / "report.json").read_text())
        assert report["method"] == "toprows"
        assert any(r["rank"] is not None and r["rel_error"] > 0 for r in report["layers"])
    finally:
        unregister("toprows")


def test_streamed_export_reloads_with_the_compressed_outputs(tmp_path, one_torch_thread):
    src = sharded("llama", tmp_path)
    opts = CompressOptions(policy=RankPolicy(keep=0.5), run=RunOptions(stream=True))
    out = compress_checkpoint(src, tmp_path / "out", opts).out_dir
    memory = compress_checkpoint(
        src, tmp_path / "mem", CompressOptions(run=RunOptions(stream=False))
    ).out_dir
    inputs = example_inputs("llama")
    a, b = load_pretrained(out), load_pretrained(memory)
    torch.testing.assert_close(outputs(a, inputs), outputs(b, inputs), rtol=0, atol=0)


def test_tensor_mode_streams_too(tiny_mlp, tmp_path, one_torch_thread):
    _, path = tiny_mlp
    memory, streamed = both(path, tmp_path)
    same_files(memory, streamed)


def test_pickle_weights_fall_back_to_memory_or_refuse_when_streaming_is_required(
    tmp_path, one_torch_thread
):
    model = build_tiny("gpt2")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    base = {"load": LoadOptions(allow_pickle=True), "policy": RankPolicy(rank=4)}
    out = compress_checkpoint(folder, tmp_path / "out", CompressOptions(**base)).out_dir
    assert (out / "config.json").is_file()
    with pytest.raises(DlncError, match="`stream`: this checkpoint cannot be streamed"):
        opts = CompressOptions(run=RunOptions(stream=True), **base)
        compress_checkpoint(folder, tmp_path / "out2", opts)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("value", "gram_route", "message"),
    [
        (float("nan"), False, "up_proj: the weight holds NaN"),
        (float("nan"), True, "up_proj: the weight holds NaN"),  # seen on the Gram's diagonal
        (1e25, True, "up_proj: weights too large for a float32 Gram matrix"),
    ],
)
def test_a_nan_weight_is_a_clean_error_and_leaves_nothing(
    value, gram_route, message, tmp_path, monkeypatch, one_torch_thread
):
    large_from = 16 if gram_route else 512  # 16: the tiny model's layers take the Gram route
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = value
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(DlncError, match=message):
        opts = CompressOptions(run=RunOptions(stream=True, large_from=large_from))
        compress_checkpoint(tmp_path / "src", tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_write_safetensors_round_trips_through_safetensors(tmp_path):
    values = {
        "a": torch.randn(3, 5, dtype=torch.bfloat16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4, 2).t(),  # not contiguous
        "d": torch.zeros(0, 3),
        "e": torch.tensor(2.5, dtype=torch.float64),  # 0-d
        "f": torch.tensor([[True, False], [False, True]]),
    }
    specs = {k: (tuple(v.shape), v.dtype) for k, v in values.items()}
    write_safetensors(tmp_path / "x.safetensors", specs, values.__getitem__, {"format": "pt"})
    back = TensorSource([tmp_path / "x.safetensors"])
    for key, value in values.items():
        assert torch.equal(back.get(key), value)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as h:
        assert h.metadata() == {"format": "pt"}
    pieces = list(back.pieces("a", max_bytes=10))  # 10 bytes: one 5-wide bf16 row at a time
    assert [tuple(p.shape) for p in pieces] == [(1, 5)] * 3
    assert torch.equal(torch.cat(pieces), values["a"])
    again = tmp_path / "y.safetensors"
    write_safetensors(again, specs, lambda k: back.pieces(k, max_bytes=10))
    assert all(torch.equal(TensorSource([again]).get(k), v) for k, v in values.items())
    with pytest.raises(RuntimeError, match="a: produced 2 rows of"):
        write_safetensors(
            again, specs, lambda k: back.pieces(k, 10) if k != "a" else [values["a"][:2]]
        )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_streamed_whiten_block_by_block_is_the_in_memory_export(family, tmp_path, one_torch_thread):
    # calibration one block at a time gives the in-memory Grams bit for bit
    # (tests/test_blocks.py), and the whitening maths is the same function on the same input
    from safetensors.torch import save_file

    from compressor.training.data import DataOptions

    src = sharded(family, tmp_path)
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(1, 64, (12, 10), generator=torch.Generator())}, data)
    # one-shot whitening by each layer's own spectrum (output-aware ranks and the correction:
    # test_streamed_output_aware_whiten_is_the_in_memory_export)
    options = {"output_aware": False, "correct": False}
    aware = MethodOptions(method="whiten", data=DataOptions(path=data, batch_size=4), **options)
    memory, streamed = both(src, tmp_path, method=aware)
    same_files(memory, streamed)
    assert json.loads((streamed / "report.json").read_text())["method"] == "whiten"


def test_streamed_whiten_of_a_vit_is_the_in_memory_export(tmp_path, one_torch_thread):
    """Block by block on images, through the renamed keys of a ViT checkpoint."""
    from safetensors.torch import save_file

    from compressor.training.data import DataOptions

    data = tmp_path / "pixels.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"pixel_values": torch.randn(8, 3, 16, 16, generator=g)}, data)
    aware = MethodOptions(method="whiten", data=DataOptions(path=data, batch_size=4))
    memory, streamed = both(sharded("vit", tmp_path), tmp_path, method=aware)
    same_files(memory, streamed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_error_correction_is_the_in_memory_one(
    family, tmp_path, monkeypatch, one_torch_thread
):
    # block by block, with the original and the compressed model's hidden states side by
    # side and one block loaded, the correction refits the layers the in-memory one refits,
    # to the same factors (GPT-2: Conv1D layers)
    from safetensors.torch import save_file

    from compressor.training.data import DataOptions

    src = sharded(family, tmp_path)
    data = tmp_path / "ids.safetensors"
    ids = torch.randint(1, 64, (64, 20), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, data)
    data_options = DataOptions(path=data, batch_size=8)
    aware = MethodOptions(method="whiten", data=data_options, output_aware=False)
    memory, streamed = both(src, tmp_path, method=aware)
    same_files(memory, streamed)
    # activations past the memory budget go to disk: the same export
    run = RunOptions(stream=True, solver="exact", memory=8 * 20_000)
    opts = CompressOptions(run=run, export=ExportOptions(max_shard_size="30KB"), method=aware)
    same_files(memory, compress_checkpoint(src, tmp_path / "spilled", opts).out_dir)
    correction = json.loads((streamed / "report.json").read_text())["correction"]
    held = round(64 * HELD_OUT)  # a causal LM's samples held out to measure its perplexity
    assert correction["tokens"] == (64 - held) * 20 and correction["refit"]
    plain = replace(aware, correct=False)
    one_shot = compress_checkpoint(
        src,
        tmp_path / "one-shot",
        CompressOptions(run=RunOptions(stream=True, solver="exact"), method=plain),
    ).out_dir
    refit = correction["refit"][0]
    key = f"{refit}.up.weight"
    assert not torch.equal(tensors(one_shot)[key], tensors(streamed)[key])  # it did refit


def test_two_processes_split_the_layers_and_write_the_same_export(tmp_path, one_torch_thread):
    # torchrun + gloo on CPU: accelerate's process state; each process decomposes every
    # other layer, the main one writes the export
    import os
    import subprocess
    import sys

    src = sharded("llama", tmp_path)
    script = Path(__file__).parent / "scripts" / "stream_ddp.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), str(src), str(tmp_path / "out-dist")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [
        {"world": 2, "main": True, "report": True},
        {"world": 2, "main": False, "report": False},
    ]
    run = RunOptions(stream=True, solver="exact")
    opts = CompressOptions(run=run, export=ExportOptions(max_shard_size="30KB"))
    single = compress_checkpoint(src, tmp_path / "out-single", opts).out_dir
    same_files(single, tmp_path / "out-dist")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no parts left


def test_a_checkpoint_too_big_for_memory_streams_by_itself(tmp_path, monkeypatch, one_torch_thread):
    # With `stream` unset, a data-free run whose in-memory peak would not fit in the available
    # memory streams, says so, and writes what the in-memory path writes.
    import compressor.workflows.compress as compress

    src = sharded("llama", tmp_path)
    export = ExportOptions(max_shard_size="30KB")
    run = RunOptions(stream=False, solver="exact")
    memory = compress_checkpoint(src, tmp_path / "memory", CompressOptions(run=run, export=export))
    assert not any("streamed" in n for n in memory.notices)
    tight = CompressOptions(run=RunOptions(solver="exact", memory=1), export=export)  # 1 byte
    assert compress.streams_by_itself(src, tight)
    assert not compress.streams_by_itself(src, replace(tight, run=replace(tight.run, stream=False)))
    auto = compress_checkpoint(src, tmp_path / "auto", tight)
    assert auto.notices[0].startswith("streamed: in memory this would need about")
    same_files(memory.out_dir, auto.out_dir)


def test_plenty_of_memory_keeps_the_in_memory_path(tmp_path, monkeypatch):
    import compressor.workflows.compress as compress

    src = sharded("llama", tmp_path)
    assert not compress.streams_by_itself(src, CompressOptions(run=RunOptions(memory=10**15)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("extra-layer", "tensors not used by the config, e.g. model.layers.2."),
        ("wide-embedding", "shape of model.embed_tokens.weight is"),
    ],
)
def test_streaming_makes_the_in_memory_loading_checks(edit, message, tmp_path):
    # A config with fewer layers than the weights, or a tensor of the wrong shape (here not a
    # targeted layer), is the in-memory path's error, not a silently different model.
    from safetensors.torch import load_file, save_file

    model = build_tiny("llama")
    model.save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    state = load_file(path)
    if edit == "extra-layer":
        state.update(
            {
                k.replace("layers.1.", "layers.2."): v.clone()
                for k, v in state.items()
                if "layers.1." in k
            }
        )
    else:
        state["model.embed_tokens.weight"] = torch.zeros(
            state["model.embed_tokens.weight"].shape[0], 3
        )
    save_file(state, path, metadata={"format": "pt"})
    for stream in (False, True):
        with pytest.raises(DlncError, match=message):
            compress_checkpoint(
                path.parent, tmp_path / f"out-{stream}", CompressOptions(run=RunOptions(stream))
            )
        assert not (tmp_path / f"out-{stream}").exists()


@pytest.mark.parametrize("shape", [(300, 96), (96, 300)])  # W^T W, and W W^T
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_the_gram_route_read_piece_by_piece_gives_the_same_factors(
    layout, shape, tmp_path, monkeypatch
):
    # a streamed reader hands W's rows and W^T's rows over piece by piece, whichever of them
    # is contiguous on disk (Conv1D stores W^T); the blocks, and so the arithmetic, are
    # those of the tensor
    from safetensors.torch import save_file

    from compressor.core import gram
    from compressor.pipelines.source import WeightReader

    monkeypatch.setattr(gram, "BLOCK_ELEMENTS", 64 * max(shape))
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    stored = w if layout == "linear" else w.t().contiguous()
    save_file({"w": stored}, tmp_path / "w.safetensors")
    read = WeightReader(TensorSource([tmp_path / "w.safetensors"]), "layer", "w", layout, shape)
    for got, want in ((read.row_blocks(64), w), (read.column_blocks(64), w.T)):
        got = list(got)
        assert [len(p) for p in got] == [len(p) for p in want.split(64)]
        assert torch.equal(torch.cat(got), want)
    for got, want in zip(gram.gram_factors(read, 20), gram.gram_factors(w, 20), strict=True):
        assert torch.equal(got, want)


def test_pass_one_keeps_the_gram_reductions_and_pass_two_forms_no_gram(
    tmp_path, monkeypatch, one_torch_thread
):
    # With the auto solver on a CPU, pass 1 reduces each large layer's Gram matrix to
    # tridiagonal form once and keeps the reduction on disk; pass 2 takes the singular
    # vectors from it and forms no Gram matrix. Without room on the disk it says so and forms
    # them again: the same export either way.
    import shutil
    from collections import namedtuple

    from compressor.core import gram

    src = sharded("llama", tmp_path)
    grams = []
    real_gram = gram.gram_matrix
    monkeypatch.setattr(gram, "gram_matrix", lambda *a, **k: grams.append(1) or real_gram(*a, **k))
    run = RunOptions(stream=True, large_from=16)  # 16: the tiny model's layers count as large
    opts = CompressOptions(
        run=run, policy=RankPolicy(keep=0.5), export=ExportOptions(max_shard_size="30KB")
    )
    kept = compress_checkpoint(src, tmp_path / "kept", opts)
    report = json.loads((kept.out_dir / "report.json").read_text())
    large = [r for r in report["layers"] if min(r["shape"]) >= 16]
    assert large and len(grams) == len(large)  # pass 1 only
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left over

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(1, 1, 0))
    grams.clear()
    again = compress_checkpoint(src, tmp_path / "again", opts)
    assert any("reduced twice" in n for n in again.notices)
    factorized = [r for r in large if r["rank"] is not None]
    assert len(grams) == len(large) + len(factorized)
    a, b = tensors(kept.out_dir), tensors(again.out_dir)
    assert sorted(a) == sorted(b)
    for key in a:  # the same vectors, up to float32 rounding (and sign: compare products)
        if key.endswith("up.weight"):
            down = key.replace("up.weight", "down.weight")
            torch.testing.assert_close(a[key] @ a[down], b[key] @ b[down], rtol=0, atol=1e-4)


def test_streamed_whiten_takes_the_float32_route_on_large_layers(
    tmp_path, monkeypatch, one_torch_thread
):
    # with the auto solver, large layers are whitened in float32 (whitener, W L's Gram); the
    # export matches the exact float64 one to float32 precision, and the errors it reports
    from safetensors.torch import save_file

    from compressor.pipelines.reductions import Reductions
    from compressor.training.data import DataOptions

    src = sharded("llama", tmp_path)
    data = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(1, 64, (12, 10), generator=torch.Generator())}, data)
    aware = MethodOptions(
        method="whiten", data=DataOptions(path=data, batch_size=4), output_aware=False,
        correct=False,
    )  # fmt: skip
    kept = {"exact": [], "auto": []}  # pass 2's bases from pass 1's reductions of W L's Gram
    real_basis = Reductions.basis
    runs, results = {}, {}
    for solver in ("exact", "auto"):

        def basis(self, name, rank, solver=solver):
            found = real_basis(self, name, rank)
            kept[solver].append(found is not None)
            return found

        monkeypatch.setattr(Reductions, "basis", basis)
        run = RunOptions(stream=True, solver=solver, large_from=16 if solver == "auto" else 512)
        opts = CompressOptions(run=run, method=aware, export=ExportOptions(max_shard_size="30KB"))
        results[solver] = compress_checkpoint(src, tmp_path / solver, opts)
        runs[solver] = results[solver].out_dir
    # the exact run never takes the float32 route, the auto run does on its large layers
    assert not any(kept["exact"]) and any(kept["auto"])
    # the weights' own spectra (for plots) are read from the checkpoint when asked for
    name = "model.layers.0.mlp.down_proj"
    want = torch.linalg.svdvals(tensors(src)[f"{name}.weight"].double())
    got = results["auto"].spectra[name].double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want[0]))
    assert len(results["auto"].spectra) == len(results["exact"].spectra)
    a, b = tensors(runs["exact"]), tensors(runs["auto"])
    assert sorted(a) == sorted(b)
    for key in a:
        if key.endswith("up.weight"):
            down = key.replace("up.weight", "down.weight")
            torch.testing.assert_close(a[key] @ a[down], b[key] @ b[down], rtol=0, atol=1e-4)
    ra, rb = (json.loads((d / "report.json").read_text())["layers"] for d in runs.values())
    for x, y in zip(ra, rb, strict=True):
        assert x["rank"] == y["rank"]
        if x["rank"] is not None:
            assert y["rel_error"] == pytest.approx(x["rel_error"], rel=1e-3, abs=1e-5)


@pytest.mark.parametrize(("family", "correct"), [("llama", True), ("gpt2", True), ("llama", False)])
def test_streamed_output_aware_whiten_is_the_in_memory_export(
    family, correct, tmp_path, monkeypatch, one_torch_thread
):
    # output-aware ranks streamed: the output sensitivity block by block (pipelines/
    # sensitivity.py: the kept inputs, the tail with the same seeded probes, the backward pass
    # one block at a time) is the whole model's backward pass bit for bit, so the gains, the
    # ranks, the output-aware factors and the correction weighed by them are the in-memory ones
    from safetensors.torch import save_file

    from compressor.methods.blocks import Activations
    from compressor.training.data import DataOptions

    src = sharded(family, tmp_path)
    data = tmp_path / "ids.safetensors"
    ids = torch.randint(1, 64, (64, 20), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, data)
    aware = MethodOptions(
        method="whiten", data=DataOptions(path=data, batch_size=8), correct=correct
    )
    assert aware.output_aware  # the default
    memory, streamed = both(src, tmp_path, method=aware)
    same_files(memory, streamed)
    report = json.loads((streamed / "report.json").read_text())
    assert report["method"] == "whiten"
    assert ("correction" in report) == correct and (not correct or report["correction"]["refit"])
    # the gains steered the allocation: without them the ranks are not these
    plain = replace(aware, output_aware=False)
    run, export = RunOptions(stream=True, solver="exact"), ExportOptions(max_shard_size="30KB")
    opts = CompressOptions(run=run, export=export, method=plain)
    ranks = {
        run: [layer["rank"] for layer in json.loads((run / "report.json").read_text())["layers"]]
        for run in (streamed, compress_checkpoint(src, tmp_path / "plain", opts).out_dir)
    }
    assert len(set(map(tuple, ranks.values()))) == 2
    if correct:  # activations past the memory budget go to disk: the same export
        spilled = []
        save = Activations._save
        monkeypatch.setattr(
            Activations, "_save", lambda a, i, x: spilled.append(i) or save(a, i, x)
        )
        run = RunOptions(stream=True, solver="exact", memory=8 * 20_000)
        opts = CompressOptions(run=run, export=export, method=aware)
        same_files(memory, compress_checkpoint(src, tmp_path / "spilled", opts).out_dir)
        assert spilled
