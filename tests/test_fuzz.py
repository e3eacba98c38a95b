"""Fuzzing every parser the user feeds (Hypothesis): safetensors headers, config.json, an
export's `dlnc` section, recipe YAML, ranks files and data files (text, JSONL, tensors).

Each input either loads or raises a one-line `DlncError`; no other exception escapes and
nothing is written beside the input. The examples are derandomized (the same inputs on
every run) so the suite stays fast and stable; DLNC_FUZZ_EXAMPLES=500 hunts with new ones."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from tiny_models import save_tiny

from compressor.errors import DlncError

HUNT = int(os.environ.get("DLNC_FUZZ_EXAMPLES", "0"))  # > 0: that many fresh random examples
FUZZ = settings(
    max_examples=HUNT or 60,
    deadline=None,
    derandomize=not HUNT,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# JSON-like values: what a hand-edited file can hold
scalars = st.none() | st.booleans() | st.integers(-3, 70) | st.floats(-2, 2) | st.text(max_size=6)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def loads_or_refuses(action: Callable[[], object], folder: Path) -> None:
    """`action` returns, or raises a one-line DlncError; the folder is left as it was."""
    before = tree(folder)
    try:
        action()
    except DlncError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
    assert tree(folder) == before


@pytest.fixture(scope="module")
def workdir():
    """One scratch folder per module; each example works in a fresh subfolder of it."""
    with tempfile.TemporaryDirectory(prefix="dlnc-fuzz-") as root:
        yield Path(root)


def fresh(workdir: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=workdir))
    return folder


# safetensors files ------------------------------------------------------------------------

NAMES = st.text(alphabet="ab.0_", max_size=5)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool)


@st.composite
def tensors(draw) -> dict[str, torch.Tensor]:
    out = {}
    for name in draw(st.lists(NAMES, max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        out[name] = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    return out


@st.composite
def safetensors_files(draw) -> bytes:
    """Valid files of odd tensors, then maybe damaged: truncated, a byte flipped, the header
    replaced by other JSON, or the header length made up."""
    data = safetensors_bytes(draw(tensors()))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "header", "length", "random"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif damage == "header":
        header = json.dumps(draw(json_values | header_dicts())).encode()
        data = struct.pack("<Q", len(header)) + header + data[8:]
    elif damage == "length":
        data = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    elif damage == "random":
        data = draw(st.binary(max_size=64))
    return data


def header_dicts():
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "X", 3]),
            "shape": st.lists(st.integers(-2, 4), max_size=3) | scalars,
            "data_offsets": st.lists(st.integers(-2, 40), max_size=3) | scalars,
        },
    )
    return st.dictionaries(NAMES | st.just("__metadata__"), entry | json_values, max_size=3)


@FUZZ
@given(data=safetensors_files())
def test_fuzz_safetensors_weights(workdir, data):
    from compressor.io.checkpoint import load_checkpoint

    folder = fresh(workdir)
    (folder / "model.safetensors").write_bytes(data)
    loads_or_refuses(lambda: load_checkpoint(folder / "model.safetensors"), folder)
    loads_or_refuses(lambda: load_checkpoint(folder), folder)


@FUZZ
@given(data=safetensors_files(), labels=st.sampled_from([None, "labels", "a"]))
def test_fuzz_safetensors_data(workdir, data, labels):
    from compressor.training.data import load_samples, make_batches

    folder = fresh(workdir)
    (folder / "data.safetensors").write_bytes(data)

    def load():
        samples = load_samples(folder / "data.safetensors", label_field=labels)
        return make_batches(samples, None, 8, 2)

    loads_or_refuses(load, folder)


# config.json ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_weights(workdir):
    return save_tiny("gpt2", workdir / "gpt2-source")[1]


GPT2_KEYS = ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions", "n_inner")
GPT2_CONFIG = {
    "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "n_layer": 2,
    "n_head": 2, "vocab_size": 64, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0,
}  # fmt: skip
# Only small models: a size key removed would fall back to GPT-2 small (or a 7B Llama for
# model_type llama), which is a slow example, not a parser check.
REMOVABLE = ("architectures", "model_type", "bos_token_id", "eos_token_id")


@st.composite
def configs(draw) -> object:
    """The tiny GPT-2's config with keys changed, removed or added, or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    base = dict(GPT2_CONFIG)
    for key in draw(st.lists(st.sampled_from(GPT2_KEYS), max_size=2, unique=True)):
        base[key] = draw(st.integers(-1, 66) | scalars)
    if draw(st.booleans()):
        base["model_type"] = draw(st.sampled_from(["gpt2", "nope", 1, None]))
    if draw(st.booleans()):
        base["architectures"] = draw(
            st.sampled_from([["GPT2LMHeadModel"], ["Nope"], "GPT2LMHeadModel", 3, None, []])
        )
    for key in draw(st.lists(st.sampled_from(REMOVABLE), max_size=1)):
        base.pop(key, None)
    return base


@FUZZ
@given(config=configs())
def test_fuzz_config_json(workdir, gpt2_weights, config):
    from compressor.io.checkpoint import load_checkpoint

    folder = fresh(workdir)
    shutil.copy(gpt2_weights / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    loads_or_refuses(lambda: load_checkpoint(folder), folder)


# the dlnc section of an export ------------------------------------------------------------


@pytest.fixture(scope="module")
def export_folder(workdir, gpt2_weights):
    from compressor.core.ranks import RankPolicy
    from compressor.options import CompressOptions
    from compressor.workflows.compress import compress_checkpoint

    out = workdir / "gpt2-export"
    compress_checkpoint(gpt2_weights, out, CompressOptions(policy=RankPolicy(rank=4)))
    return out


@st.composite
def sections(draw, section: dict) -> object:
    """The export's own section with values replaced, or any JSON at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    section = json.loads(json.dumps(section))
    for key in draw(st.lists(st.sampled_from(sorted(section)), max_size=2)):
        section[key] = draw(json_values)
    layers = section.get("layers")
    if isinstance(layers, dict) and layers:
        name = draw(st.sampled_from(sorted(layers)))
        spec = layers[name]
        if isinstance(spec, dict):
            for key in draw(
                st.lists(st.sampled_from(["rank", "shape", "layout", "bias"]), max_size=2)
            ):
                spec[key] = draw(json_values | st.lists(st.integers(-1, 130), max_size=3))
        if draw(st.booleans()):
            layers[draw(NAMES)] = layers.pop(name)
    return section


@FUZZ
@given(data=st.data())
def test_fuzz_dlnc_section(workdir, export_folder, data):
    from compressor.io.load import load_pretrained

    config = json.loads((export_folder / "config.json").read_text())
    config["dlnc"] = data.draw(sections(config["dlnc"]))
    folder = fresh(workdir)
    for f in export_folder.iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(config))
    loads_or_refuses(lambda: load_pretrained(folder), folder)


# recipes and ranks files ------------------------------------------------------------------

yaml_texts = st.one_of(
    st.text(alphabet="abk: -\n[]{}'\"#0.1e5&*!|>", max_size=40),
    json_values.map(lambda v: yaml.safe_dump(v)),
)


@st.composite
def recipe_texts(draw) -> str:
    """A shipped recipe with keys changed, or other YAML."""
    if draw(st.booleans()):
        return draw(yaml_texts)
    from compressor.recipes.schema import load_recipe

    recipe = load_recipe("gpt2").model_dump(mode="json")
    section = draw(st.sampled_from(sorted(k for k, v in recipe.items() if isinstance(v, dict))))
    key = draw(st.sampled_from([*sorted(recipe[section]), "typo"]))
    recipe[section][key] = draw(json_values)
    return yaml.safe_dump(recipe)


@FUZZ
@given(text=recipe_texts())
def test_fuzz_recipe_yaml(workdir, text):
    from compressor.recipes.schema import load_recipe

    folder = fresh(workdir)
    (folder / "recipe.yaml").write_text(text)
    loads_or_refuses(lambda: load_recipe(folder / "recipe.yaml"), folder)


@st.composite
def ranks_texts(draw) -> bytes:
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=40))
    if choice == 1:
        return draw(yaml_texts).encode()
    data = {"dlnc_ranks": draw(st.integers(0, 2) | scalars), "ranks": draw(json_values)}
    if choice == 3:
        data["ranks"] = draw(st.dictionaries(NAMES, st.integers(-1, 9) | scalars, max_size=3))
        data[draw(st.sampled_from(["method", "keep", "model", "typo"]))] = draw(json_values)
    return yaml.safe_dump(data).encode()


@FUZZ
@given(data=ranks_texts())
def test_fuzz_ranks_file(workdir, data):
    from compressor.io.rankfile import load_ranks

    folder = fresh(workdir)
    (folder / "ranks.yaml").write_bytes(data)
    loads_or_refuses(lambda: load_ranks(folder / "ranks.yaml"), folder)


# data files -------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_fuzz_text_data(workdir, data):
    from compressor.training.data import load_samples

    folder = fresh(workdir)
    (folder / "data.txt").write_bytes(data)
    loads_or_refuses(lambda: load_samples(folder / "data.txt"), folder)


jsonl_rows = st.one_of(
    st.fixed_dictionaries({"text": scalars}, optional={"label": json_values}),
    json_values.map(lambda v: v),
)


@FUZZ
@given(
    rows=st.lists(jsonl_rows.map(json.dumps) | st.text(max_size=8), max_size=4),
    label=st.sampled_from([None, "label", "text"]),
)
def test_fuzz_jsonl_data(workdir, rows, label):
    from compressor.training.data import load_samples

    folder = fresh(workdir)
    (folder / "data.jsonl").write_text("\n".join(r.replace("\n", " ") for r in rows))
    loads_or_refuses(lambda: load_samples(folder / "data.jsonl", label_field=label), folder)
