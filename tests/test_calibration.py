"""Gram collection with hooks: exact sums over real tokens, shared inputs, Conv1D layouts."""

from __future__ import annotations

import pytest
import torch

from compressor.core.targets import find_targets
from compressor.errors import DlncError
from compressor.methods.calibration import collect_grams
from tests.conftest import MLP, build_tiny


def padded_batches():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3, 2, 10), generator=g)
    mask = torch.ones(3, 2, 10, dtype=torch.long)
    mask[0, 1, 6:] = 0
    mask[2, 0, 3:] = 0
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask, strict=True)]


def assert_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """`gram` is X^T X (float64) for the rows X of `x`, to the precision of float32 products
    (the per-batch products run in float32): within 1e-6 of its largest entry."""
    x = x.detach().double()
    want = x.T @ x
    assert gram.dtype == torch.float64
    torch.testing.assert_close(gram, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def captured_inputs(model, name, batches):
    """The layer's inputs on real tokens, captured independently with a forward hook."""
    seen = []
    module = model.get_submodule(name)

    def hook(_module, args, _output):
        seen.append(args[0].detach())

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    rows = [x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)]
    return torch.cat(rows).double()


@pytest.mark.parametrize(
    ("family", "layer"),
    [("bert", "bert.encoder.layer.1.intermediate.dense"), ("gpt2", "transformer.h.0.mlp.c_fc")],
)
def test_gram_is_the_sum_over_real_tokens(family, layer):
    model = build_tiny(family)
    batches = padded_batches()
    stats = collect_grams(model, find_targets(model), batches)
    x = captured_inputs(model, layer, batches)
    assert stats[layer].rows == x.shape[0] == int(sum(b["attention_mask"].sum() for b in batches))
    assert_gram(stats[layer].gram, x)


def test_layers_fed_the_same_input_share_one_matrix():
    model = build_tiny("llama")
    stats = collect_grams(model, find_targets(model), padded_batches())
    attn = "model.layers.0.self_attn."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[attn + "o_proj"] is not stats[attn + "q_proj"]
    mlp = "model.layers.1.mlp."
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]


def test_plain_module_and_progress():
    model = MLP().eval()
    x = torch.randn(3, 5, 16)
    calls = []
    stats = collect_grams(
        model, find_targets(model), [{"x": b} for b in x], progress=lambda *a: calls.append(a)
    )
    assert_gram(stats["fc1"].gram, x.reshape(-1, 16))
    assert calls[-1] == ("calibrate", 3, 3)


def test_data_the_model_does_not_take():
    model = MLP().eval()
    with pytest.raises(DlncError, match="does not take the data's inputs"):
        collect_grams(model, find_targets(model), [{"pixel_values": torch.randn(2, 16)}])


def test_t5_calibrates_with_teacher_forcing(tmp_path):
    """The decoder's layers see the text as their input, shifted right (as in fine-tuning)."""
    from compressor.core.targets import find_targets
    from compressor.methods.calibration import collect_grams

    model = build_tiny("t5")
    ids = torch.randint(2, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = find_targets(model)
    stats = collect_grams(model, targets, [batch])
    assert set(stats) == set(targets)
    # the decoder's first query projection saw the embeddings of [start, ids[:-1]]
    shifted = torch.cat([torch.zeros(2, 1, dtype=ids.dtype), ids[:, :-1]], 1)
    block = model.decoder.block[0].layer[0]
    x = block.layer_norm(model.decoder.embed_tokens(shifted)).reshape(-1, 32).double()
    assert_gram(stats["decoder.block.0.layer.0.SelfAttention.q"].gram, x)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_grams_counted_on_the_sensitivity_pass_equal_collect_grams(family):
    # the sensitivity's forward passes (with grad) count the same inputs as collect_grams'
    # own inference passes, and counting them changes no sensitivity
    from compressor.methods.calibration import GramCollector
    from compressor.methods.sensitivity import output_sensitivity

    model = build_tiny(family)
    targets = find_targets(model)
    want = collect_grams(model, targets, padded_batches())
    alone = output_sensitivity(model, targets, padded_batches(), probes=2)
    collector = GramCollector(targets)
    sens = output_sensitivity(model, targets, padded_batches(), probes=2, grams=collector)
    got = collector.result()
    for name in targets:
        assert got[name].rows == want[name].rows
        torch.testing.assert_close(got[name].gram, want[name].gram, rtol=1e-6, atol=1e-6)
        assert torch.equal(sens[name], alone[name])
    shared = "model.layers.0.self_attn."
    if family == "llama":
        assert got[shared + "q_proj"] is got[shared + "v_proj"]


def test_probed_batches_are_the_fewest_leading_ones_holding_the_tokens():
    from compressor.methods.sensitivity import probed_batches

    batches = padded_batches()  # 16, 20 and 13 real tokens
    assert [probed_batches(batches, t) for t in (1, 16, 17, 36, 37, 10**6, None)] == [
        1, 1, 2, 2, 3, 3, 3,
    ]  # fmt: skip
    unmasked = [{"input_ids": b["input_ids"]} for b in batches]  # 20 tokens each
    assert [probed_batches(unmasked, t) for t in (20, 21, 60)] == [1, 2, 3]
    pixels = [{"pixel_values": torch.zeros(4, 3, 8, 8)}] * 3  # no tokens: its samples
    assert probed_batches(pixels, 5) == 2


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_the_sensitivity_probes_the_leading_batches_and_the_grams_count_all(family):
    # past the token budget the batches run forward only: the sensitivity is the one of the
    # leading batches alone, the Grams are still every batch's
    from compressor.methods.calibration import GramCollector
    from compressor.methods.sensitivity import output_sensitivity

    model = build_tiny(family)
    targets = find_targets(model)
    batches = padded_batches()
    collector = GramCollector(targets)
    sens = output_sensitivity(model, targets, batches, probes=2, grams=collector, tokens=17)
    leading = output_sensitivity(model, targets, batches[:2], probes=2, tokens=None)
    everything = output_sensitivity(model, targets, batches, probes=2, tokens=None)
    want = collect_grams(model, targets, batches)
    got = collector.result()
    for name in targets:
        assert torch.equal(sens[name], leading[name])
        assert not torch.equal(sens[name], everything[name])
        assert got[name].rows == want[name].rows == 49
        torch.testing.assert_close(got[name].gram, want[name].gram, rtol=1e-6, atol=1e-6)


def test_the_sensitivity_pass_computes_no_weight_gradient():
    # only the activations' gradients are needed: the weights' would double the backward pass
    from compressor.methods.sensitivity import output_sensitivity

    model = build_tiny("llama")
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(g))
    output_sensitivity(model, find_targets(model), padded_batches())
    assert not seen
    assert all(p.requires_grad for p in model.parameters())  # flags back


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_head_stand_in_has_the_heads_covariance_and_the_same_sensitivity(family, monkeypatch):
    # C C^T = W^T W for the square stand-in of a vocabulary-wide head, so its probes'
    # gradients have the logits' covariance: with many probes both sensitivities agree;
    # the head is back afterwards
    from contextlib import nullcontext

    from compressor.methods import sensitivity

    model = build_tiny(family, vocab_size=256)
    head = model.get_output_embeddings()
    w = head.weight.detach().double()
    with sensitivity.head_probe(model):
        stand_in = model.get_output_embeddings()
        assert stand_in is not head and stand_in.weight.shape == (w.shape[1], w.shape[1])
        c = stand_in.weight.detach().double().T
        torch.testing.assert_close(c @ c.T, w.T @ w, rtol=1e-5, atol=1e-5)
    assert model.get_output_embeddings() is head
    targets = find_targets(model)
    batches = padded_batches()
    square = sensitivity.output_sensitivity(model, targets, batches, probes=24, seed=1)
    monkeypatch.setattr(sensitivity, "head_probe", lambda model: nullcontext())
    wide = sensitivity.output_sensitivity(model, targets, batches, probes=24, seed=1)
    for name in targets:
        ratio = float(square[name].mean() / wide[name].mean())
        assert 0.85 < ratio < 1.18, (name, ratio)  # measured 0.97-1.07
