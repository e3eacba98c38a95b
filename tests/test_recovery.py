"""The fine-tuning workflow (disk -> disk): which models load, the data split, the export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny
from finetune_helpers import compressed
from safetensors.torch import save_file

from compressor.core.surgery import factorized_layers
from compressor.errors import DlncError
from compressor.io.export import export
from compressor.io.load import load_pretrained
from compressor.options import FinetuneOptions
from compressor.recipes.schema import load_recipe
from compressor.training.data import DataOptions, load_data
from compressor.workflows.finetune import finetune_checkpoint, load_model
from compressor.workflows.options import finetune_options


@pytest.fixture
def folders(tmp_path):
    """A tiny GPT-2 teacher folder, its compressed export and 20 samples of token ids."""
    teacher = build_tiny("gpt2")
    teacher.save_pretrained(tmp_path / "teacher")
    export(compressed(teacher), tmp_path / "student", config=teacher.config,
           source=tmp_path / "teacher")  # fmt: skip
    ids = torch.randint(1, 64, (20, 8), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, tmp_path / "train.safetensors")
    return tmp_path


def test_load_model_reads_exports_and_plain_checkpoints(folders):
    assert factorized_layers(load_model(folders / "student"))
    assert not factorized_layers(load_model(folders / "teacher"))


def test_held_out_share_comes_off_the_end_of_the_samples(folders):
    options = DataOptions(folders / "train.safetensors", batch_size=4)
    data = load_data(options, folders / "teacher", eval_fraction=0.25)
    assert data.samples == 20
    assert sum(len(b["input_ids"]) for b in data.train) == 15
    assert sum(len(b["input_ids"]) for b in data.held_out) == 5
    assert load_data(options, folders / "teacher").held_out is None


def test_finetune_checkpoint_exports_a_reloadable_student_with_its_report(folders):
    options = finetune_options(load_recipe("gpt2"), folders / "train.safetensors",
                               config={"steps": 2, "warmup": 0.0})  # fmt: skip
    run = finetune_checkpoint(folders / "student", folders / "out", teacher=folders / "teacher",
                              options=options)  # fmt: skip
    report = json.loads((folders / "out" / "report.json").read_text())
    assert report["finetune"]["steps"] == 2 and len(run.result.losses) == 2
    reloaded = load_pretrained(folders / "out")
    ids = torch.randint(1, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits,
                                   run.result.model(input_ids=ids).logits)  # fmt: skip


def test_a_model_without_factors_is_refused(folders):
    options = FinetuneOptions(DataOptions(folders / "train.safetensors"))
    with pytest.raises(DlncError, match="no factorized layers"):
        finetune_checkpoint(folders / "teacher", folders / "out", options=options)
    assert not (folders / "out").exists()


def test_fine_tuning_without_data_names_the_missing_parameter():
    with pytest.raises(DlncError, match="`finetune_data`"):
        finetune_options(load_recipe("gpt2"), None)
