"""Hierarchical token dropping (Data-LTH / EViT) in lotus_deploy.prune.tickets: plans, the dropping forward, online vs cached tickets."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from lotus_deploy.models import build_model
from lotus_deploy.prune import tickets as T
from lotus_deploy.recipe.base import ModelConfig

VARIANTS = {"plain": {}, "registers": {"reg_tokens": 2}, "patch4": {"patch_size": 4}}


def _tiny(kwargs: dict | None = None):
    """lotus_vit_tiny_patch8_32 (4 blocks, 16 patches; 64 with patch 4), seeded, eval mode."""
    torch.manual_seed(0)
    return build_model(ModelConfig(name="lotus_vit_tiny_patch8_32", num_classes=10, kwargs=dict(kwargs or {}))).eval()


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def _block_inputs(model, fn):
    """Run ``fn()``; returns its result and the token count entering each block, per call."""
    seen = []
    hs = [b.register_forward_pre_hook(lambda _m, a, i=i: seen.append((i, a[0].shape[1]))) for i, b in enumerate(model.blocks)]
    try:
        out = fn()
    finally:
        for h in hs:
            h.remove()
    return out, seen


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize(
    "patches_kw,at,keeps,kept",
    [
        ({}, [1, 2, 3], [0.7, 0.7, 0.7], (12, 9, 7)),  # ceil(11.2), ceil(8.4), ceil(6.3)
        ({"patch_size": 4}, [1, 2, 3], [0.7, 0.7, 0.7], (45, 32, 23)),
        ({}, [2], [0.5], (8,)),
        ({}, [1, 3], [0.9, 0.5], (15, 8)),
    ],
    ids=["16-patches-0.7-each", "64-patches-0.7-each", "one-location", "ratio-per-location"],
)
def test_drop_plan_resolves_k_per_location_relative_to_the_entering_patches(patches_kw, at, keeps, kept):
    plan = T.drop_plan(_tiny(patches_kw), at, keeps)
    assert (plan.at, plan.kept) == (tuple(at), kept)
    assert plan.scoring_blocks == [a - 1 for a in at] and plan.width == sum(kept)
    assert all(isinstance(k, int) for k in plan.kept)


@pytest.mark.parametrize(
    "at,keeps",
    [([0], [0.7]), ([4], [0.7]), ([2, 1], [0.7, 0.7]), ([1, 1], [0.7, 0.7]), ([1, 2], [0.7]), ([], [])],
    ids=["no-block-before-0", "past-the-last-block", "descending", "repeated", "ratio-count", "empty"],
)
def test_drop_plan_rejects(at, keeps):
    with pytest.raises(ValueError):
        T.drop_plan(_tiny(), at, keeps)


def test_tokens_per_block_and_split():
    plan = T.drop_plan(_tiny(), [1, 3], [0.5, 0.5])  # K = 8, 4
    assert plan.tokens_per_block(4, 1) == [17, 9, 9, 5]
    parts = plan.split(torch.arange(2 * 12).view(2, 12))
    assert [p.shape for p in parts] == [torch.Size([2, 8]), torch.Size([2, 4])]
    with pytest.raises(ValueError, match="columns"):
        plan.split(torch.zeros(2, 11, dtype=torch.long))


# ----------------------------------------------------------------------------- the dropping forward


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@pytest.mark.parametrize("mode", ["online-attention", "given-tickets", "online-random"])
def test_token_count_after_each_drop_block_is_prefix_plus_k(variant, mode):
    m = _tiny(VARIANTS[variant])
    npre, P = m.num_prefix_tokens, T.num_patches(m)
    plan = T.drop_plan(m, [1, 2, 3], [0.7] * 3)
    x = _images(3)
    kw = {
        "online-attention": {},
        "given-tickets": {"tickets": T.random_nested_tickets(3, plan, seed=4)},
        "online-random": {"selection": "random", "generator": torch.Generator().manual_seed(0)},
    }[mode]
    (feats, used), seen = _block_inputs(m, lambda: T.forward_features_dropping(m, x, plan, **kw))
    assert seen == [(0, npre + P)] + [(a, npre + k) for a, k in zip(plan.at, plan.kept)]
    assert feats.shape == (3, npre + plan.kept[-1], m.embed_dim)
    assert [u.shape for u in used] == [torch.Size([3, k]) for k in plan.kept]
    for prev, cur in zip([torch.arange(P).expand(3, P)] + used[:-1], used):  # nested, ascending, unique
        assert bool((cur[:, 1:] > cur[:, :-1]).all())
        assert bool(torch.isin(cur, prev).all()) if cur.shape == prev.shape else all(
            bool(torch.isin(cur[i], prev[i]).all()) for i in range(3))
    if mode == "given-tickets":
        assert all(torch.equal(u, t) for u, t in zip(used, kw["tickets"]))


def _reference_dropping(model, x, plan, tickets):
    """An independent path: per image, boolean membership of the original patch ids, no gather/searchsorted.

    Returns:
        per location, the (B, prefix + K_i, C) tokens entering the drop block.
    """
    npre = model.num_prefix_tokens
    out = [[] for _ in plan.at]
    for n in range(x.shape[0]):
        h = model.norm_pre(T._embed(model, x[n: n + 1]))  # (1, prefix + P, C)
        ids = torch.arange(plan.patches)
        for b, blk in enumerate(model.blocks):
            if b in plan.at:
                i = plan.at.index(b)
                keep = torch.isin(ids, tickets[i][n])  # (n_cur,) bool
                h = torch.cat([h[:, :npre], h[:, npre:][:, keep]], dim=1)
                ids = ids[keep]
                out[i].append(h)
            h = blk(h)
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("variant", ["plain", "registers"])
def test_kept_tokens_equal_the_reference_path_at_every_drop_point(variant):
    m = _tiny(VARIANTS[variant])
    plan = T.drop_plan(m, [1, 3], [0.6, 0.5])
    x = _images(4)
    with torch.no_grad():
        tickets = T.hierarchical_tickets(m, x, plan)
        want = _reference_dropping(m, x, plan, tickets)
        got = []
        hs = [m.blocks[a].register_forward_pre_hook(lambda _m, a_: got.append(a_[0])) for a in plan.at]
        T.forward_features_dropping(m, x, plan, tickets)
        for h in hs:
            h.remove()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # at the first drop point nothing was dropped before: the kept tokens are the full forward's, at the kept patch ids
    full = m.blocks[: plan.at[0]](m.norm_pre(T._embed(m, x)))  # (B, prefix + P, C)
    npre = m.num_prefix_tokens
    torch.testing.assert_close(got[0][:, npre:], torch.stack([full[n, npre:][tickets[0][n]] for n in range(4)]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][:, :npre], full[:, :npre], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "registers"])
def test_kept_tokens_carry_their_positional_embedding(variant):
    m = copy.deepcopy(_tiny(VARIANTS[variant]))
    with torch.no_grad():  # every patch token = its positional embedding; blocks pass tokens through
        m.patch_embed.proj.weight.zero_()
        m.patch_embed.proj.bias.zero_()
        m.pos_embed.normal_()
    m.blocks = torch.nn.Sequential(*[torch.nn.Identity() for _ in m.blocks])
    plan = T.DropPlan(at=(1, 2, 3), kept=(12, 9, 7), patches=16)
    tickets = T.random_nested_tickets(5, plan, seed=2)
    h, used = T.forward_features_dropping(m, _images(5), plan, tickets, upto=3)  # tokens entering block 3
    npre = m.num_prefix_tokens
    patch_pos = m.pos_embed[0, -16:]  # (P, C): the patches' positions (timm adds them before any drop)
    torch.testing.assert_close(h[:, npre:], patch_pos[used[-1]])
    assert not torch.equal(h[:, npre:], patch_pos[: plan.kept[-1]].expand_as(h[:, npre:]))  # not simply the first K positions


def test_given_tickets_must_be_nested():
    m = _tiny()
    plan = T.drop_plan(m, [1, 2], [0.5, 0.5])  # K = 8, 4
    t1 = torch.arange(8).expand(2, 8)
    with pytest.raises(ValueError, match="nested"):
        T.forward_features_dropping(m, _images(2), plan, [t1, torch.tensor([[0, 1, 2, 15], [0, 1, 2, 3]])])


def test_dropping_forward_with_keep_one_equals_the_normal_forward():
    m = _tiny()
    plan = T.drop_plan(m, [1, 2, 3], [1.0] * 3)
    x = _images()
    torch.testing.assert_close(T.forward_tokens_dropping(m, x, plan), m(x), rtol=1e-5, atol=1e-5)


def test_online_scores_are_the_previous_blocks_cls_attention():
    m = _tiny()
    plan = T.drop_plan(m, [2], [0.5])
    x = _images(4)
    want = T.top_k(T.score_images(m, x, [1])["normalize"], 8)  # block 1 sees every token: the input-level scores
    _, used = T.forward_features_dropping(m, x, plan)
    assert torch.equal(used[0], want)
    _, excl = T.forward_features_dropping(m, x, plan, sink="exclude")
    assert torch.equal(excl[0], T.top_k(T.score_images(m, x, [1])["exclude"], 8))


def test_dropping_forward_trains_through_the_kept_tokens():
    m = _tiny().train()
    plan = T.drop_plan(m, [1, 2, 3], [0.7] * 3)
    T.forward_tokens_dropping(m, _images(4), plan).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0
    assert all(b.attn.qkv.weight.grad.abs().sum() > 0 for b in m.blocks)
    assert not any(b.attn.qkv._forward_hooks for b in m.blocks)  # capture hooks removed


def test_random_nested_tickets_are_seeded_and_nested():
    plan = T.DropPlan(at=(1, 2), kept=(10, 5), patches=16)
    a, b = T.random_nested_tickets(20, plan, 3), T.random_nested_tickets(20, plan, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], T.random_nested_tickets(20, plan, 3, epoch=1)[0])
    assert all(bool(torch.isin(a[1][i], a[0][i]).all()) for i in range(20))


# ----------------------------------------------------------------------------- online vs cached


@pytest.mark.parametrize("sink", T.SINKS)
def test_online_scoring_equals_cached_scoring_on_unaugmented_images(sink):
    m = _tiny({"patch_size": 4})
    plan = T.drop_plan(m, [1, 2, 3], [0.7] * 3)
    x = _images(10)
    cached = T.hierarchical_dataset(m, TensorDataset(x, torch.arange(10)), plan, torch.device("cpu"), sink, batch_size=4)
    assert list(cached) == ["at1", "at2", "at3"] and all(v.dtype == torch.long for v in cached.values())
    table = T.plan_tables(cached, plan)  # (10, sum K_i): what a TicketDataset hands the student
    student = copy.deepcopy(m).train()  # the teacher is the student: the choice happens inside its own forward
    _, online = T.forward_features_dropping(student, x, plan, sink=sink)
    assert all(torch.equal(o, c) for o, c in zip(online, plan.split(table)))
    # the student run on the cached tickets computes what it computes when it chooses them itself
    torch.testing.assert_close(T.forward_tokens_dropping(student, x, plan, plan.split(table)), T.forward_tokens_dropping(student, x, plan, sink=sink))


def test_input_level_online_scoring_equals_cached_scoring():
    m = _tiny()
    x = _images(10)
    scores = T.score_dataset(m, TensorDataset(x, torch.arange(10)), [3], torch.device("cpu"), batch_size=3)["normalize"]
    cached = T.select_tickets(scores, 10, 16, 11, "attention")
    online = T.top_k(T.score_images(m, x, [3])["normalize"], 11)
    assert torch.equal(cached, online)
