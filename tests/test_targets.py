import pytest
from conftest import build_tiny

from compressor.core.targets import find_targets, matches


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("gpt2", 8),  # c_attn, c_proj, c_fc, mlp.c_proj per block (Conv1D)
        ("bert", 12),  # q, k, v, attn out, intermediate, output per block
        ("llama", 14),  # q, k, v, o, gate, up, down per block
        ("vit", 12),
    ],
)
def test_default_targets_skip_embeddings_and_heads(family, expected):
    targets = find_targets(build_tiny(family))
    assert len(targets) == expected
    for name in targets:
        assert not any(h in name for h in ("lm_head", "classifier", "cls.", "pooler", "embed"))


def test_include_and_exclude_by_name_and_regex():
    model = build_tiny("llama")
    only_q = find_targets(model, include=["q_proj"])
    assert list(only_q) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    no_mlp = find_targets(model, exclude=["re:\\.mlp\\."])
    assert len(no_mlp) == 8 and all(".mlp." not in n for n in no_mlp)


def test_heads_can_be_targeted_when_asked():
    model = build_tiny("gpt2")
    assert "lm_head" in find_targets(model, exclude_defaults=False)


def test_matches():
    assert matches("a.b.q_proj", "q_proj")
    assert not matches("a.b.xq_proj", "q_proj")
    assert matches("a.b.q_proj", "re:b\\.q")
