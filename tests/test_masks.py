"""Masks: exact density, global vs per-layer semantics, purity, existing masks, set algebra."""

from __future__ import annotations

import pytest
import torch

from lotus_deploy.masks import (
    apply_masks_,
    expected_zeros,
    hamming,
    intersection,
    magnitude_masks,
    mask_sparsity,
    masks_hash,
    union,
    vote,
    weight_stats,
)
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.scope import DEFAULT_SCOPE, select_weights

SPARSITIES = [0.0, 0.1, 1 / 3, 0.5, 0.77, 0.9, 0.99]


def zeros(m: torch.Tensor) -> int:
    return int((~m).sum())


def scaled_weights() -> dict[str, torch.Tensor]:
    """Three tensors (odd sizes) with disjoint magnitude ranges, |a| < |b| < |c|, random signs."""
    g = torch.Generator().manual_seed(0)

    def signed(*shape, lo):
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return sign * (lo + torch.rand(*shape, generator=g) * lo)

    return {"a.weight": signed(7, 13, lo=0.01), "b.weight": signed(11, 5, lo=1.0), "c.weight": signed(3, 3, 3, 3, lo=100.0)}


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s:.2f}")
def test_global_density_within_one_weight(micro_model, sparsity):
    w = select_weights(micro_model, DEFAULT_SCOPE)
    m = magnitude_masks(w, sparsity, "global")
    n = sum(t.numel() for t in w.values())
    z = sum(zeros(x) for x in m.values())
    assert abs(z - sparsity * n) <= 1
    assert z == expected_zeros(sparsity, n)
    assert mask_sparsity(m) == pytest.approx(z / n)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{s:.2f}")
def test_per_layer_density_within_one_weight(micro_model, sparsity):
    w = select_weights(micro_model, DEFAULT_SCOPE)
    m = magnitude_masks(w, sparsity, "per_layer")
    for k, t in w.items():
        assert abs(zeros(m[k]) - sparsity * t.numel()) <= 1, k
        assert zeros(m[k]) == expected_zeros(sparsity, t.numel())


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
def test_masks_match_shapes_and_dtype(micro_model, granularity):
    w = select_weights(micro_model, DEFAULT_SCOPE)
    m = magnitude_masks(w, 0.5, granularity)
    assert set(m) == set(w)
    for k in w:
        assert m[k].shape == w[k].shape and m[k].dtype == torch.bool


def test_per_layer_every_tensor_at_target():
    w = scaled_weights()
    m = magnitude_masks(w, 0.4, "per_layer")
    for k, t in w.items():
        assert zeros(m[k]) == round(0.4 * t.numel())


def test_global_total_at_target_and_layers_differ():
    w = scaled_weights()
    m = magnitude_masks(w, 0.5, "global")
    n = sum(t.numel() for t in w.values())  # 91 + 55 + 81 = 227 -> 114 zeros
    assert sum(zeros(x) for x in m.values()) == round(0.5 * n) == 114
    assert [zeros(m[k]) for k in w] == [91, 114 - 91, 0]  # smallest tensor first, largest untouched


def test_global_removes_the_smallest_magnitudes():
    w = scaled_weights()
    m = magnitude_masks(w, 0.6, "global")
    pruned = torch.cat([w[k][~m[k]].abs() for k in w])
    kept = torch.cat([w[k][m[k]].abs() for k in w])
    assert pruned.max() <= kept.min()


def test_per_layer_removes_the_smallest_in_each_tensor():
    w = scaled_weights()
    m = magnitude_masks(w, 0.6, "per_layer")
    for k in w:
        assert w[k][~m[k]].abs().max() <= w[k][m[k]].abs().min()


def test_ties_still_give_the_exact_count():
    w = {"x": torch.ones(10, 10), "y": torch.zeros(3, 7)}
    for s in (0.25, 0.5, 0.9):
        m = magnitude_masks(w, s, "global")
        assert sum(zeros(x) for x in m.values()) == round(s * 121)
        m = magnitude_masks(w, s, "per_layer")
        assert zeros(m["x"]) == round(s * 100) and zeros(m["y"]) == round(s * 21)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5], ids=["one", "negative", "above-one"])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_masks(scaled_weights(), sparsity)


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
def test_masks_computed_without_touching_the_model(micro_model, granularity):
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in micro_model.named_parameters()}
    hooks = sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in micro_model.modules())
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.7, granularity)
    assert sum(zeros(m) for m in masks.values()) > 0
    after = micro_model.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert flags == {k: p.requires_grad for k, p in micro_model.named_parameters()}
    assert hooks == sum(len(mod._forward_pre_hooks) + len(mod._forward_hooks) for mod in micro_model.modules())
    for m in masks.values():  # masks are their own tensors, not views of the weights
        assert m.dtype == torch.bool and not m.requires_grad


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
def test_existing_masks_respected(granularity):
    w = scaled_weights()
    g = torch.Generator().manual_seed(1)
    existing = {k: torch.rand(t.shape, generator=g) > 0.3 for k, t in w.items()}  # random, not by magnitude
    new = magnitude_masks(w, 0.6, granularity, existing=existing)
    for k in w:
        assert not (new[k] & ~existing[k]).any(), "a removed weight came back"
    if granularity == "global":
        assert sum(zeros(x) for x in new.values()) == round(0.6 * sum(t.numel() for t in w.values()))
    else:
        for k, t in w.items():
            assert zeros(new[k]) == max(round(0.6 * t.numel()), zeros(existing[k]))


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
def test_existing_sparser_than_target_is_kept(granularity):
    w = scaled_weights()
    existing = magnitude_masks({k: torch.randn_like(t) for k, t in w.items()}, 0.6, granularity)
    new = magnitude_masks(w, 0.5, granularity, existing=existing)
    for k in w:
        assert torch.equal(new[k], existing[k])


def test_apply_masks_zeros_exactly_the_masked_weights(micro_model):
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.5, "global")
    assert apply_masks_(micro_model, masks) is micro_model
    after = micro_model.state_dict()
    for k in before:
        if k in masks:
            assert (after[k][~masks[k]] == 0).all()
            assert torch.equal(after[k][masks[k]], before[k][masks[k]])
        else:
            assert torch.equal(after[k], before[k]), k
    stats = weight_stats(micro_model, list(masks))
    assert stats["sparsity"] == pytest.approx(mask_sparsity(masks), abs=1e-6)


# ----------------------------------------------------------------------------- set algebra


def T(bits):  # noqa: N802
    return torch.tensor(bits, dtype=torch.bool)


A = {"w": T([1, 1, 0, 0]), "v": T([1, 0])}
B = {"w": T([1, 0, 1, 0]), "v": T([1, 1])}
C = {"w": T([0, 1, 1, 0]), "v": T([0, 0])}


@pytest.mark.parametrize(
    "fn,sets,expected",
    [
        (union, (A, B), {"w": T([1, 1, 1, 0]), "v": T([1, 1])}),
        (intersection, (A, B), {"w": T([1, 0, 0, 0]), "v": T([1, 0])}),
        (union, (A, B, C), {"w": T([1, 1, 1, 0]), "v": T([1, 1])}),
        (intersection, (A, B, C), {"w": T([0, 0, 0, 0]), "v": T([0, 0])}),
        (vote, (A, B, C), {"w": T([1, 1, 1, 0]), "v": T([1, 0])}),
        (vote, (A, B), {"w": T([1, 0, 0, 0]), "v": T([1, 0])}),  # strict majority of 2 = both
        (vote, (A,), A),
        (union, (A,), A),
    ],
    ids=["union2", "intersection2", "union3", "intersection3", "vote3", "vote2-strict", "vote1", "union1"],
)
def test_set_algebra(fn, sets, expected):
    got = fn(*sets)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_set_algebra_does_not_mutate_inputs():
    a = {k: v.clone() for k, v in A.items()}
    union(a, B)
    intersection(a, B)
    vote(a, B, C)
    for k in A:
        assert torch.equal(a[k], A[k])


@pytest.mark.parametrize("fn", [union, intersection, vote])
def test_set_algebra_refuses_mismatched_keys(fn):
    with pytest.raises(ValueError, match="different parameters"):
        fn(A, {"w": A["w"]})
    with pytest.raises(ValueError, match="at least one"):
        fn()


def test_hamming_sparsity_and_hash():
    assert hamming(A, A) == 0.0
    assert hamming(A, B) == pytest.approx(3 / 6)
    assert mask_sparsity(A) == pytest.approx(3 / 6)
    assert mask_sparsity({}) == 0.0
    assert masks_hash(A) == masks_hash({"v": A["v"].clone(), "w": A["w"].clone()})  # order-free
    flipped = {"w": A["w"].clone(), "v": A["v"].clone()}
    flipped["w"][3] = True
    assert masks_hash(flipped) != masks_hash(A)
    assert masks_hash({"w": A["w"].view(2, 2), "v": A["v"]}) != masks_hash(A)  # shape counts
    assert masks_hash({"x": A["w"], "v": A["v"]}) != masks_hash(A)  # names count


def test_weight_stats(micro_model):
    with torch.no_grad():
        micro_model.head.weight.zero_()
    s = weight_stats(micro_model, ["head.weight", "head.bias"])
    n_w, n_b = micro_model.head.weight.numel(), micro_model.head.bias.numel()
    assert s["params"] == n_w + n_b
    assert s["nonzeros"] == int(torch.count_nonzero(micro_model.head.bias))
    assert s["sparsity"] == pytest.approx(1 - s["nonzeros"] / (n_w + n_b))
    whole = weight_stats(micro_model)
    assert whole["params"] == sum(p.numel() for p in micro_model.parameters())
