"""The one scope grammar: exact, glob, ``re:``, ``!`` exclusion; what the default scope selects."""

from __future__ import annotations

import pytest

from lotus_deploy.scope import DEFAULT_SCOPE, check_pattern, matches, select_weights

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@pytest.mark.parametrize(
    "name,patterns,expected",
    [
        ("head", ["head"], True),
        ("head.bias", ["head"], False),  # exact means exact
        ("blocks.0.attn.qkv", ["blocks.0.attn.qkv"], True),
        ("blocks.10.attn.qkv", ["blocks.1.attn.qkv"], False),
        ("blocks.3.mlp.fc1", ["blocks.*.mlp.fc1"], True),
        ("blocks.3.mlp.fc2", ["blocks.*.mlp.fc1"], False),
        ("blocks.3.mlp.fc1", ["blocks.*"], True),  # * crosses dots
        ("blocks.3.mlp.fc1", ["blocks.?.mlp.fc[12]"], True),
        ("blocks.11.attn.proj", ["re:blocks\\.(1[01])\\..*"], True),
        ("blocks.1.attn.proj", ["re:blocks\\.(1[01])\\..*"], False),
        ("xblocks.0.attn.qkv", ["re:blocks\\..*"], False),  # regexes match from the start
        ("blocks.0.attn.qkv", ["blocks.*", "!blocks.0.*"], False),
        ("blocks.1.attn.qkv", ["blocks.*", "!blocks.0.*"], True),
        ("blocks.0.attn.qkv", ["!blocks.0.*", "blocks.*"], False),  # exclusion wins wherever it is
        ("blocks.0.mlp.fc2", ["blocks.*", "!re:.*fc2"], False),
        ("head", ["!head"], False),  # only exclusions select nothing
    ],
    ids=[
        "exact", "exact-not-prefix", "exact-dotted", "exact-not-prefix-number", "glob", "glob-miss", "glob-crosses-dots",
        "glob-class", "regex", "regex-miss", "regex-anchored", "exclude", "exclude-other", "exclude-first", "exclude-regex",
        "only-exclusion",
    ],
)
def test_matches(name, patterns, expected):
    assert matches(name, patterns) is expected


@pytest.mark.parametrize(
    "pattern,fragment",
    [("", "empty"), ("!", "empty"), ("re:blocks.([", "bad regular expression"), ("!re:(", "bad regular expression")],
    ids=["empty", "bare-bang", "bad-regex", "bad-excluded-regex"],
)
def test_check_pattern_rejects(pattern, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["head", "blocks.*", "re:blocks\\.\\d+\\..*", "!head.bias", "[ab]*"])
def test_check_pattern_accepts(pattern):
    assert check_pattern(pattern) == pattern


def test_default_scope_is_block_linear_weights(micro_model):
    got = set(select_weights(micro_model, DEFAULT_SCOPE))
    depth = len(micro_model.blocks)
    assert got == {f"blocks.{i}.{lin}.weight" for i in range(depth) for lin in BLOCK_LINEARS}


def test_default_scope_excludes_everything_else(micro_model):
    got = select_weights(micro_model, DEFAULT_SCOPE)
    for name in got:
        assert name.endswith(".weight") and got[name].ndim == 2
    for name in ("patch_embed.proj.weight", "pos_embed", "cls_token", "head.weight", "head.bias", "norm.weight",
                 "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.attn.qkv.bias", "blocks.1.mlp.fc1.bias"):
        assert name not in got


def test_default_scope_excludes_layer_scale():
    """DINOv2-style blocks hold ``ls1.gamma`` / ``ls2.gamma``: not Linear weights, not selected."""
    from timm.models.vision_transformer import VisionTransformer

    m = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, init_values=1e-5, num_classes=3)
    assert "blocks.0.ls1.gamma" in dict(m.named_parameters())
    assert set(select_weights(m, DEFAULT_SCOPE)) == {f"blocks.0.{lin}.weight" for lin in BLOCK_LINEARS}


@pytest.mark.parametrize(
    "patterns,expected",
    [
        (["head"], {"head.weight"}),
        (["head", "head.bias"], {"head.weight", "head.bias"}),
        (["head.*"], {"head.weight", "head.bias"}),
        (["pos_embed", "cls_token"], {"pos_embed", "cls_token"}),
        (["patch_embed.proj"], {"patch_embed.proj.weight"}),
        (["blocks.0.norm1"], set()),  # norms are never selected through their module name
        (["blocks.0.norm1.weight"], {"blocks.0.norm1.weight"}),
        (["blocks.*.mlp.fc1"], {"blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight"}),
        (["re:blocks\\.1\\.attn\\..*"], {"blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight"}),
        (["blocks.*", "!blocks.0.*", "!re:.*fc2"], {"blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc1.weight"}),
        (["blocks.1.*.bias"], {f"blocks.1.{lin}.bias" for lin in BLOCK_LINEARS} | {"blocks.1.norm1.bias", "blocks.1.norm2.bias"}),
        (["*"], {"patch_embed.proj.weight", "head.weight"} | {f"blocks.{i}.{lin}.weight" for i in range(2) for lin in BLOCK_LINEARS}),
        (["blocks.*", "head"], {"head.weight"} | {f"blocks.{i}.{lin}.weight" for i in range(2) for lin in BLOCK_LINEARS}),
        (["nothing.here"], set()),
    ],
    ids=[
        "head-by-module", "head-bias-named", "head-glob-params", "tokens", "patch-embed", "norm-module", "norm-param",
        "glob-fc1", "regex-block1-attn", "exclusions", "biases-by-param-glob", "star-is-prunable-weights",
        "blocks-plus-head", "no-match",
    ],
)
def test_select_weights(micro_model, patterns, expected):
    assert set(select_weights(micro_model, patterns)) == expected


def test_select_weights_returns_the_parameters(micro_model):
    params = dict(micro_model.named_parameters())
    for name, p in select_weights(micro_model, DEFAULT_SCOPE).items():
        assert p is params[name]
