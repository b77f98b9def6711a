"""Attention scores from qkv, ticket selection strategies and the token-dropping forward (lotus_deploy.prune.tickets)."""

from __future__ import annotations

import typing

import pytest
import torch

from lotus_deploy.models import build_model
from lotus_deploy.prune import tickets as T
from lotus_deploy.recipe.base import ModelConfig
from lotus_deploy.recipe.stages import LotteryFinetune

VARIANTS = {
    "plain": {},
    "registers": {"reg_tokens": 2},
    "qk_norm": {"qk_norm": True},
}


def _model(kwargs: dict):
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="lotus_vit_micro_patch8_32", num_classes=10, kwargs=dict(kwargs))).eval()
    if kwargs.get("qk_norm"):  # make q/k norms non-trivial so skipping them would show
        with torch.no_grad():
            for blk in m.blocks:
                blk.attn.q_norm.weight.uniform_(0.5, 1.5)
                blk.attn.k_norm.bias.uniform_(-0.5, 0.5)
    return m


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


# ----------------------------------------------------------------------------- attention from qkv


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@pytest.mark.parametrize("block", [0, 1], ids=["block0", "block1"])
def test_attention_from_qkv_equals_unfused_attention(variant, block):
    m = _model(VARIANTS[variant])
    attn = m.blocks[block].attn
    attn.fused_attn = False
    seen = {}
    h1 = attn.attn_drop.register_forward_hook(lambda _m, inp, _o: seen.__setitem__("attn", inp[0].detach()))
    with T.capture_qkv(m, [block]) as qkv:
        m(_images())
    h1.remove()
    ref = seen["attn"]  # (B, H, N, N): timm's own unfused softmax
    got = T.attention_from_qkv(attn, qkv[block])
    assert got.shape == ref.shape == (6, 2, m.num_prefix_tokens + 16, m.num_prefix_tokens + 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(T.attention_from_qkv(attn, qkv[block], rows=slice(0, 1)), ref[:, :, :1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_cls_attention_with_fused_attention_on(variant):
    m = _model(VARIANTS[variant])
    assert all(b.attn.fused_attn for b in m.blocks)  # fused attention stays on while scoring
    x = _images()
    rows = T.cls_attention(m, x, [0, 1])  # (B, L, H, N)
    assert rows.shape == (6, 2, 2, m.num_prefix_tokens + 16)
    torch.testing.assert_close(rows.sum(-1), torch.ones(6, 2, 2))
    for b in m.blocks:
        b.attn.fused_attn = False
    seen = []
    hs = [b.attn.attn_drop.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0][:, :, 0])) for b in m.blocks]
    m(x)
    for h in hs:
        h.remove()
    torch.testing.assert_close(rows, torch.stack(seen, 1), rtol=1e-5, atol=1e-6)
    assert not any(b.attn.qkv._forward_hooks for b in m.blocks)  # hooks removed


def test_cls_attention_runs_only_up_to_the_last_chosen_block():
    m = _model({})
    calls = []
    h = m.blocks[1].register_forward_pre_hook(lambda *_: calls.append(1))
    T.cls_attention(m, _images(2), [0])
    h.remove()
    assert calls == []


@pytest.mark.parametrize(
    "blocks,expected", [("last", [1]), ("mean", [0, 1]), ([-1], [1]), ([1, 0, 1], [0, 1])], ids=["last", "mean", "negative", "list"]
)
def test_resolve_blocks(blocks, expected):
    assert T.resolve_blocks(_model({}), blocks) == expected


@pytest.mark.parametrize("blocks", [[2], [], "first"], ids=["out-of-range", "empty", "unknown-word"])
def test_resolve_blocks_rejects(blocks):
    with pytest.raises(ValueError):
        T.resolve_blocks(_model({}), blocks)


# ----------------------------------------------------------------------------- sink handling


def test_sink_modes_agree_within_one_head_and_differ_across_heads():
    # One image, one block, two heads over CLS + 4 patches.
    rows = torch.tensor([[[[0.90, 0.050, 0.030, 0.010, 0.010],     # head 0: strong sink, prefers patch 0
                           [0.00, 0.100, 0.300, 0.300, 0.300]]]])  # head 1: no sink, prefers patches 1..3
    one_head = rows[:, :, :1]
    n1, e1 = T.patch_scores(one_head, 1, "normalize"), T.patch_scores(one_head, 1, "exclude")
    assert torch.equal(n1.argsort(), e1.argsort())  # per head: same order, different scale
    torch.testing.assert_close(n1, e1 / e1.sum() * 4 / 5)  # prefix weight -> mean patch weight, renormalized
    n, e = T.patch_scores(rows, 1, "normalize"), T.patch_scores(rows, 1, "exclude")
    # exclude: head 0's patches weigh little (0.1 of its row); normalize: both heads count equally
    assert T.top_k(e, 1).item() != T.top_k(n, 1).item()
    with pytest.raises(ValueError):
        T.patch_scores(rows, 1, "keep")


def test_patch_scores_skip_every_prefix_token():
    rows = torch.softmax(torch.randn(3, 1, 2, 3 + 9), -1)  # CLS + 2 registers + 9 patches
    assert T.patch_scores(rows, 3, "exclude").shape == (3, 9)
    torch.testing.assert_close(T.patch_scores(rows, 3, "exclude"), rows[..., 3:].mean((1, 2)))


# ----------------------------------------------------------------------------- tickets


@pytest.mark.parametrize(
    "patches,keep,k",
    [(16, 0.9, 15), (64, 0.9, 58), (64, 1 - 0.1, 58), (10, 0.7, 7), (10, 1 - 0.3, 7), (64, 0.5, 32), (16, 1.0, 16), (16, 0.01, 1)],
    ids=["16@0.9", "64@0.9", "64@drop0.1", "10@0.7", "10@drop0.3", "64@0.5", "all", "at-least-one"],
)
def test_num_kept(patches, keep, k):
    assert T.num_kept(patches, keep) == k


@pytest.mark.parametrize("selection", T.SELECTIONS)
def test_tickets_have_fixed_k_sorted_unique_indices(selection):
    scores = torch.rand(20, 16, generator=torch.Generator().manual_seed(0))
    k = 16 if selection == "full" else T.num_kept(16, 0.7)  # 12
    t = T.select_tickets(scores, 20, 16, k, selection, seed=3)
    assert t.shape == (20, k) and t.dtype == torch.long
    assert bool((t[:, 1:] > t[:, :-1]).all()) and int(t.min()) >= 0 and int(t.max()) < 16


def test_every_selection_value_has_a_strategy():
    values = typing.get_args(LotteryFinetune.model_fields["selection"].annotation)
    assert set(values) == set(T.SELECTIONS)
    assert all(T.SELECTIONS[v].name == v for v in values)
    assert [v for v in values if T.SELECTIONS[v].needs_teacher] == ["attention"]
    assert [v for v in values if T.SELECTIONS[v].redraws] == ["random"]


def test_selection_registry_refuses_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        T.SELECTIONS.add("random", T.FullSelection())
    assert isinstance(T.SELECTIONS["random"], T.RandomSelection)
    with pytest.raises(ValueError, match="selection must be one of"):
        T.select_tickets(None, 4, 16, 8, "best")


@pytest.mark.parametrize("keep,want", [(0.9, 15), (0.7, 12), (0.5, 8), (1.0, 16)])
def test_k_is_resolved_once_and_passed_as_an_integer(keep, want):
    k = T.num_kept(16, keep)
    assert isinstance(k, int) and k == want
    for selection in ("attention", "random"):
        assert T.select_tickets(torch.rand(3, 16), 3, 16, k, selection).shape == (3, k)
    for bad in (keep, 0, 17):  # a fraction is not a K
        with pytest.raises(ValueError, match="k must be an int"):
            T.select_tickets(None, 3, 16, bad, "random")


def test_random_tickets_equal_the_seeded_random_scores():
    g = T.ticket_generator(5, 2)
    assert torch.equal(T.select_tickets(None, 10, 16, 8, "random", seed=5, epoch=2), T.top_k(T.random_scores(10, 16, 5, 2), 8))
    assert torch.equal(T.SELECTIONS["random"].pick(None, 10, 16, 8, g), T.top_k(T.random_scores(10, 16, 5, 2), 8))


def test_attention_tickets_are_the_top_scores():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0))
    t = T.select_tickets(scores, 8, 16, 8, "attention")
    kept = torch.zeros(8, 16, dtype=torch.bool).scatter_(1, t, True)
    assert bool((scores[kept].view(8, 8).min(1).values > scores[~kept].view(8, 8).max(1).values).all())


def test_random_tickets_seeded_per_epoch_and_differ_from_attention():
    scores = torch.rand(50, 16, generator=torch.Generator().manual_seed(0))
    att = T.select_tickets(scores, 50, 16, 8, "attention")
    r0 = T.select_tickets(None, 50, 16, 8, "random", seed=5, epoch=0)
    assert torch.equal(r0, T.select_tickets(None, 50, 16, 8, "random", seed=5, epoch=0))
    assert not torch.equal(r0, T.select_tickets(None, 50, 16, 8, "random", seed=5, epoch=1))
    assert not torch.equal(r0, T.select_tickets(None, 50, 16, 8, "random", seed=6, epoch=0))
    ov = T.ticket_overlap(att, r0)
    assert ov["images_changed"] > 0.9 and ov["shared"] < 0.75  # chance level is 0.5
    assert T.ticket_overlap(att, att) == {"shared": 1.0, "images_changed": 0.0}


def test_drop_frequency_counts_dropped_positions():
    table = torch.tensor([[0, 1], [0, 2], [0, 3]])  # P = 4, K = 2: patch 0 always kept
    f = T.drop_frequency(table, 4)
    assert torch.allclose(f, torch.tensor([0.0, 2 / 3, 2 / 3, 2 / 3]))
    r = T.select_tickets(None, 50, 16, 12, "random", seed=1)
    assert T.drop_frequency(r, 16).mean().item() == pytest.approx(1 - 12 / 16)


def test_attention_selection_needs_matching_scores():
    with pytest.raises(ValueError):
        T.select_tickets(None, 4, 16, 8, "attention")
    with pytest.raises(ValueError):
        T.select_tickets(torch.rand(4, 9), 4, 16, 8, "attention")


# ----------------------------------------------------------------------------- token-dropping forward


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_gather_with_keep_one_equals_the_normal_forward(variant):
    m = _model(VARIANTS[variant])
    x = _images()
    idx = T.select_tickets(None, 6, 16, 16, "full")
    torch.testing.assert_close(T.forward_tokens(m, x, idx), m(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(T.forward_tokens(m, x, None), m(x), rtol=1e-5, atol=1e-5)
    idx_keep1 = T.select_tickets(torch.rand(6, 16), 6, 16, 16, "attention")  # K = P, in order
    torch.testing.assert_close(T.forward_tokens(m, x, idx_keep1), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "registers"])
@pytest.mark.parametrize("keep", [0.5, 0.25], ids=["keep0.5", "keep0.25"])
def test_blocks_run_on_prefix_plus_k_tokens(variant, keep):
    m = _model(VARIANTS[variant])
    npre = m.num_prefix_tokens
    x = _images(4)
    idx = T.select_tickets(None, 4, 16, T.num_kept(16, keep), "random", seed=0)
    K = idx.shape[1]
    inputs = []
    hs = [b.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].detach())) for b in m.blocks]
    logits = T.forward_tokens(m, x, idx)
    for h in hs:
        h.remove()
    assert logits.shape == (4, 10)
    assert [t.shape for t in inputs] == [torch.Size([4, npre + K, 32])] * len(m.blocks)
    full = m.norm_pre(T._embed(m, x))  # (B, prefix + P, C)
    torch.testing.assert_close(inputs[0][:, :npre], full[:, :npre])  # prefix tokens kept, first
    torch.testing.assert_close(inputs[0][:, npre:], torch.stack([full[i, npre:][idx[i]] for i in range(4)]))


def test_token_forward_trains():
    m = _model({}).train()
    x, idx = _images(4), T.select_tickets(None, 4, 16, 8, "random")
    T.forward_tokens(m, x, idx).sum().backward()
    assert m.pos_embed.grad is not None and m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_non_vit_is_rejected():
    with pytest.raises(TypeError, match="VisionTransformer"):
        T.check_token_model(torch.nn.Linear(3, 3))
    T.check_token_model(_model({}))


# ----------------------------------------------------------------------------- scoring and cache


def test_score_dataset_is_deterministic_and_batch_independent():
    from torch.utils.data import TensorDataset

    m = _model({})
    ds = TensorDataset(_images(10), torch.arange(10))
    a = T.score_dataset(m, ds, [1], torch.device("cpu"), batch_size=4)
    b = T.score_dataset(m, ds, [1], torch.device("cpu"), batch_size=4)
    c = T.score_dataset(m, ds, [1], torch.device("cpu"), batch_size=10)
    assert set(a) == set(T.SINKS) and a["normalize"].shape == (10, 16)
    assert all(torch.equal(a[s], b[s]) for s in T.SINKS)
    torch.testing.assert_close(a["exclude"], c["exclude"])
    assert not m.training


def test_cached_scores_compute_once_then_reuse(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"normalize": torch.rand(3, 16), "exclude": torch.rand(3, 16)}

    info = {"teacher": "abc", "blocks": [1]}
    s1, src1, p1 = T.cached_scores(tmp_path, "train", info, compute)
    s2, src2, p2 = T.cached_scores(tmp_path, "train", dict(info), compute)
    assert (src1, src2, len(calls)) == ("computed", "cache", 1) and p1 == p2
    assert torch.equal(s1["normalize"], s2["normalize"])
    _, src3, p3 = T.cached_scores(tmp_path, "train", {**info, "teacher": "abd"}, compute)
    assert src3 == "computed" and p3 != p1 and len(calls) == 2


def test_weights_hash_tracks_every_weight():
    m = _model({})
    h = T.weights_hash(m)
    assert h == T.weights_hash(_model({}))
    with torch.no_grad():
        m.blocks[1].mlp.fc2.weight[0, 0] += 1e-6
    assert T.weights_hash(m) != h


# ----------------------------------------------------------------------------- figures


def test_grey_dropped_greys_exactly_the_dropped_patches():
    img = torch.rand(2, 3, 32, 32)
    idx = torch.tensor([[0, 5], [15, 3]])
    out = T.grey_dropped(img, idx, (4, 4))
    for b in range(2):
        for p in range(16):
            r, c = divmod(p, 4)
            patch = out[b, :, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8]
            if p in idx[b].tolist():
                assert torch.equal(patch, img[b, :, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8])
            else:
                assert bool((patch == 0.5).all())


def test_ticket_grid_and_curves_png_written(tmp_path):
    img = torch.rand(5, 3, 32, 32)
    p = T.save_ticket_grid(img, T.select_tickets(None, 5, 16, 8, "random"), (4, 4), tmp_path / "t.png", "title", list("abcde"))
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = [{"epoch": 1, "train_acc": 10.0, "train_loss": 2.3, "eval_top1": 12.0, "eval_loss": 2.2, "eval_ticket_top1": 11.0, "eval_ticket_loss": 2.25},
            {"epoch": 2, "train_acc": 20.0, "train_loss": 2.0, "eval_top1": 22.0, "eval_loss": 2.0, "eval_ticket_top1": 21.0, "eval_ticket_loss": 2.1}]
    c = T.save_curves(hist, tmp_path / "c.png")
    assert c.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and c.stat().st_size > 5000
