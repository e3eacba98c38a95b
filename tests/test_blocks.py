"""Block-by-block calibration: the same statistics as running the whole model in memory."""

from __future__ import annotations

import pytest
import torch

from compressor.core.targets import find_targets
from compressor.io.streaming import module_loader
from compressor.methods.blocks import block_grams, find_blocks, stream_blocks
from compressor.methods.calibration import collect_grams
from compressor.options import LoadOptions
from compressor.pipelines.source import open_streamed


def padded_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    out = []
    for length in (7, 11):
        ids = torch.randint(1, 64, (2, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, length - 3 :] = 0  # padding: left out of the Grams
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def streamed_grams(folder, batches, spill_dir=None):
    ckpt = open_streamed(folder, LoadOptions())
    loaded, source, keys = ckpt.loaded, ckpt.tensors, ckpt.keys
    targets = find_targets(loaded.model)
    grams, names = {}, []
    for block in stream_blocks(loaded.model, batches, module_loader(source, keys), spill_dir):
        grams.update(block_grams(block, targets))
        names.append(block.name)
    return loaded.model, grams, names


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_block_by_block_grams_equal_the_in_memory_grams(family, tiny_model, one_torch_thread):
    model, folder = tiny_model(family)
    batches = padded_batches()
    reference = collect_grams(model, find_targets(model), batches)
    meta, grams, names = streamed_grams(folder, batches)
    stack, _ = find_blocks(meta)
    assert names == [f"{stack}.0", f"{stack}.1"]
    assert sorted(grams) == sorted(reference)  # every target sits in a block here
    for name, st in reference.items():
        assert grams[name].rows == st.rows
        # the very same float32 operations, one block at a time: equal bit for bit
        assert torch.equal(grams[name].gram, st.gram), name
    shared = {id(s) for s in grams.values()}
    assert len(shared) == len({id(s) for s in reference.values()})  # q/k/v share one Gram
    assert all(p.is_meta for p in meta.get_submodule(stack).parameters())  # all released


@pytest.mark.parametrize("spill_over", [0, 2000, 10**9])  # all / from the second batch / none
def test_activations_spilled_to_disk_give_the_same_grams(
    spill_over, tiny_model, tmp_path, one_torch_thread
):
    _, folder = tiny_model("llama")
    batches = padded_batches()  # 2 x 7 and 2 x 11 tokens of 32 float32 features: 1792, 2816 B
    _, in_memory, _ = streamed_grams(folder, batches)
    spill = tmp_path / "spill"
    spill.mkdir()
    ckpt = open_streamed(folder, LoadOptions())
    loaded, source, keys = ckpt.loaded, ckpt.tensors, ckpt.keys
    targets = find_targets(loaded.model)
    load = module_loader(source, keys)
    on_disk, files = {}, []
    for block in stream_blocks(loaded.model, batches, load, spill, spill_over=spill_over):
        on_disk.update(block_grams(block, targets))
        files.append(sorted(p.relative_to(spill).parent.name for p in spill.rglob("*.pt")))
    for name, st in in_memory.items():
        assert torch.equal(on_disk[name].gram, st.gram)
    if spill_over == 10**9:
        assert files == [[], []]
    else:  # both batches on disk, one block's inputs at a time
        assert files == [["in", "in"], ["0", "0"]]
    assert list(spill.iterdir()) == []  # the activations are removed afterwards


def test_a_block_changed_by_the_consumer_feeds_the_next_block(tiny_model, one_torch_thread):
    # error-correcting calibration: block 1 sees what the (here: zeroed) block 0 produces
    _, folder = tiny_model("llama")
    batches = padded_batches()
    ckpt = open_streamed(folder, LoadOptions())
    loaded, source, keys = ckpt.loaded, ckpt.tensors, ckpt.keys
    seen = []
    for block in stream_blocks(loaded.model, batches, module_loader(source, keys)):
        seen.append(block.hidden.get(0).clone())
        if block.index == 0:
            with torch.no_grad():
                block.module.mlp.down_proj.weight.zero_()
                block.module.self_attn.o_proj.weight.zero_()
    torch.testing.assert_close(seen[1], seen[0])  # block 0 became the identity (residuals)


def test_wide_inputs_can_be_collected_in_float32(tiny_model, one_torch_thread):
    # streamed whitening's large layers: half the memory, float32 precision
    _, folder = tiny_model("llama")  # inputs 32 wide, and 64 into down_proj
    batches = padded_batches()
    _, reference, _ = streamed_grams(folder, batches)
    ckpt = open_streamed(folder, LoadOptions())
    loaded, source, keys = ckpt.loaded, ckpt.tensors, ckpt.keys
    targets = find_targets(loaded.model)
    single = {}
    for block in stream_blocks(loaded.model, batches, module_loader(source, keys)):
        single.update(block_grams(block, targets, single_from=64))
    assert sorted(single) == sorted(reference)
    for name, st in single.items():
        want = reference[name].gram
        assert st.rows == reference[name].rows
        if name.endswith("down_proj"):
            assert st.gram.dtype == torch.float32
            torch.testing.assert_close(st.gram.double(), want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(st.gram, want)


@pytest.mark.parametrize(("family", "tokens"), [("llama", None), ("gpt2", None), ("bert", 1)])
def test_block_by_block_sensitivity_is_the_whole_models(
    family, tokens, tiny_model, tmp_path, one_torch_thread
):
    # forward keeping each block's inputs, the tail with the same seeded probes, backward one
    # block at a time: output_sensitivity's numbers bit for bit (padding left out, two probes
    # per batch, a tied head on GPT-2 and BERT, activations in memory or all on disk; the
    # same probed batches under a token budget)
    from compressor.methods.sensitivity import output_sensitivity
    from compressor.pipelines.sensitivity import blockwise_sensitivity
    from compressor.pipelines.source import release

    model, folder = tiny_model(family)
    targets = find_targets(model)
    want = output_sensitivity(model, targets, padded_batches(), probes=2, seed=3, tokens=tokens)
    ckpt = open_streamed(folder, LoadOptions())
    meta = ckpt.loaded.model
    (tmp_path / "spill").mkdir()
    for spill in (None, tmp_path / "spill"):
        got = blockwise_sensitivity(
            meta, {n: meta.get_submodule(n) for n in targets}, padded_batches(),
            module_loader(ckpt.tensors, ckpt.keys), probes=2, seed=3, spill_dir=spill,
            tokens=tokens,
        )  # fmt: skip
        release(meta)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[n], want[n]) for n in want), family
        assert all(got[n].abs().sum() > 0 for n in want)
    assert all(p.is_meta for p in meta.parameters())  # nothing left loaded
    assert not list((tmp_path / "spill").iterdir())  # nor spilled
