"""Channel permutations: same network function, never less kept magnitude, better when it can be."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.permute import (
    _OTHERS,
    _swap_gains,
    find_channel_groups,
    permute_,
    permute_for_two_four_,
    permute_masks,
    search_permutation,
)
from lotus_deploy.prune.two_four import two_four_masks


def kept_ratio(a: torch.Tensor) -> float:
    return float((a * two_four_masks(a)).sum() / a.sum())


@pytest.fixture
def varied_model(micro_model):
    """The micro ViT with larger, varied weights, so a wrong permutation shows in the outputs."""
    with torch.no_grad():
        for p in micro_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    return micro_model


def block_linear_weights(model) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


def test_search_reaches_the_optimum_on_clustered_columns():
    a = torch.ones(8, 16)
    a[:, :8] = 10.0  # the large columns fill groups 0 and 1: 2:4 drops half of them
    r = search_permutation(a, seconds=5.0)
    assert r.kept_before == pytest.approx(44 / 88)
    assert r.kept_after == pytest.approx(80 / 88)  # 2 large + 2 small per group: every large kept
    assert r.converged
    assert kept_ratio(a[:, r.perm]) == pytest.approx(r.kept_after)


@pytest.mark.parametrize(
    "shape,block,seed",
    [((32, 64), None, 0), ((16, 32), 16, 1), ((8, 48), 8, 2), ((64, 16), None, 3), ((12, 8), 4, 4)],
    ids=["mlp32x64", "heads16", "heads8", "tall", "one-group-per-block"],
)
def test_search_never_lowers_kept_magnitude_and_respects_blocks(shape, block, seed):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).abs()
    r = search_permutation(a, block=block, seconds=2.0, seed=seed)
    k = shape[1]
    assert sorted(r.perm.tolist()) == list(range(k))
    assert r.kept_after >= r.kept_before
    assert r.kept_before == pytest.approx(kept_ratio(a))
    assert r.kept_after == pytest.approx(kept_ratio(a[:, r.perm]))
    b = block or k
    assert all(int(p) // b == c // b for c, p in enumerate(r.perm))  # never leaves its block
    if b // 4 >= 2:
        assert r.kept_after > r.kept_before  # random magnitudes always leave room


def test_sampled_search_without_full_pass_still_improves():
    a = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)).abs()
    r = search_permutation(a, seconds=1.0, max_elems=16 * 16 * 4)  # forces sampled pairs
    assert r.kept_after > r.kept_before
    assert sorted(r.perm.tolist()) == list(range(256))


def test_swap_gains_match_brute_force():
    x = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(0))  # (O, G, 4)
    xt = x.permute(1, 2, 0).contiguous()
    r = xt[:, _OTHERS].topk(2, dim=2).values
    old = xt.topk(2, dim=1).values.sum((1, 2))
    g1, g2 = torch.tensor([0, 1, 2]), torch.tensor([3, 5, 4])
    gains = _swap_gains(xt, r[:, :, 0].sum(-1), r[:, :, 1].contiguous(), old, g1, g2)
    for p in range(3):
        for i in range(4):
            for j in range(4):
                y = x.clone()
                y[:, g1[p], i], y[:, g2[p], j] = x[:, g2[p], j], x[:, g1[p], i]
                want = y.topk(2, -1).values.sum() - x.topk(2, -1).values.sum()
                assert gains[p, i, j] == pytest.approx(float(want), abs=1e-5)


def test_finds_mlp_and_attention_pairs(micro_model):
    groups, why = find_channel_groups(micro_model)
    assert set(groups) == {f"blocks.{b}.{l}.weight" for b in (0, 1) for l in ("attn.proj", "mlp.fc2")}
    g = groups["blocks.0.attn.proj.weight"]
    assert g.block == 16 and g.channels == 32  # 2 heads of 16: permuted within each head
    assert ("blocks.0.attn.qkv.weight", 0, 64) in g.params  # V rows start after q and k
    assert groups["blocks.0.mlp.fc2.weight"].block == 64
    assert "residual stream" in why["blocks.0.attn.qkv.weight"]
    assert "residual stream" in why["blocks.1.mlp.fc1.weight"]
    assert "no supported producer" in why["head.weight"]


def test_permutation_preserves_the_network_function(varied_model):
    model = varied_model
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    out = permute_for_two_four_(model, block_linear_weights(model), seconds=1.0)
    assert len(out.perms) == 4  # every proj and fc2 moved
    assert set(out.skipped) == {f"blocks.{b}.{l}.weight" for b in (0, 1) for l in ("attn.qkv", "mlp.fc1")}
    for r in out.layers.values():
        assert r["kept_after"] > r["kept_before"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_cross_head_permutation_would_change_the_function(varied_model):
    """Control: the test above can fail. Moving V channels between heads is not allowed."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = varied_model(x)
    g = find_channel_groups(varied_model)[0]["blocks.0.attn.proj.weight"]
    perm = torch.arange(32)
    perm[[0, 16]] = perm[[16, 0]]  # channel 0 of head 0 <-> channel 0 of head 1
    permute_(varied_model, g, perm)
    with torch.no_grad():
        assert (varied_model(x) - ref).abs().max() > 1e-2  # 1000x the tolerance used above


def test_masks_follow_the_weights(varied_model):
    """With earlier masks, the masked network is the same function after permuting weights and masks."""
    micro_model = varied_model
    names = block_linear_weights(micro_model)
    params = dict(micro_model.named_parameters())
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(params[n].shape, generator=g) < 0.6 for n in names}
    frozen = {k: v.clone() for k, v in masks.items()}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = apply_masks_(copy.deepcopy(micro_model), masks)(x)
    out = permute_for_two_four_(micro_model, names, masks, seconds=1.0)
    assert all(torch.equal(masks[k], frozen[k]) for k in masks)  # inputs untouched (pure)
    assert any(not torch.equal(out.masks[k], masks[k]) for k in masks)
    with torch.no_grad():
        torch.testing.assert_close(apply_masks_(micro_model, out.masks)(x), ref, atol=1e-5, rtol=1e-5)


def test_mlp_with_layernorm_is_supported_and_batchnorm_is_skipped():
    from timm.layers import Mlp

    mlp = Mlp(32, 64, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        mlp.norm.weight.uniform_(0.5, 2.0)
        mlp.norm.bias.uniform_(-1.0, 1.0)
    groups, _ = find_channel_groups(mlp)
    g = groups["fc2.weight"]
    assert ("norm.weight", 0, 0) in g.params and ("norm.bias", 0, 0) in g.params
    x = torch.randn(5, 32)
    ref = mlp(x).detach()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    permute_(mlp, g, perm)
    torch.testing.assert_close(mlp(x).detach(), ref, atol=1e-5, rtol=1e-5)

    groups, why = find_channel_groups(Mlp(32, 64, norm_layer=nn.BatchNorm1d))
    assert not groups and "BatchNorm1d" in why["fc2.weight"]


def test_permute_masks_is_pure():
    from lotus_deploy.prune.permute import ChannelGroup

    g = ChannelGroup("b.weight", "a", 4, 4, (("b.weight", 1, 0), ("a.weight", 0, 0)))
    masks = {"b.weight": torch.tensor([[True, False, True, False]]), "a.weight": torch.eye(4, dtype=torch.bool)}
    out = permute_masks(masks, g, torch.tensor([1, 0, 3, 2]))
    assert out["b.weight"].tolist() == [[False, True, False, True]]
    assert torch.equal(out["a.weight"], torch.eye(4, dtype=torch.bool)[[1, 0, 3, 2]])
    assert masks["b.weight"].tolist() == [[True, False, True, False]]
