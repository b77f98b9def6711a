"""Instant soup's parts: combine strategies and mask algebra, levels, schedule, capping, learners."""

from __future__ import annotations

import typing

import pytest
import torch

from lotus_deploy.masks import magnitude_masks, mask_sparsity, masks_hash
from lotus_deploy.prune import soup
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.soup import (
    COMBINES,
    Combine,
    cap_sparsity,
    combine_masks,
    default_levels,
    level_masks,
    round_target,
    rounds_needed,
)
from lotus_deploy.recipe.stages import InstantSoup


def _m(*bits):
    return {"w": torch.tensor(bits, dtype=torch.bool)}


A, B, C = _m(1, 1, 0, 0, 1, 0), _m(1, 0, 1, 0, 1, 0), _m(0, 0, 1, 0, 1, 1)


@pytest.mark.parametrize(
    "sets, how, expected",
    [
        ((A, B, C), "union", (1, 1, 1, 0, 1, 1)),
        ((A, B, C), "union_levels", (1, 1, 1, 0, 1, 1)),
        ((A, B, C), "intersection", (0, 0, 0, 0, 1, 0)),
        ((A, B, C), "vote", (1, 0, 1, 0, 1, 0)),  # kept by at least 2 of 3
        ((A, B), "vote", (1, 0, 0, 0, 1, 0)),  # strict majority of 2 = both
        ((A,), "vote", (1, 1, 0, 0, 1, 0)),
        ((A, B, C, _m(1, 1, 1, 0, 0, 0)), "vote", (1, 0, 1, 0, 1, 0)),  # 3 of 4
    ],
    ids=["union", "union-levels", "intersection", "vote-3", "vote-2", "vote-1", "vote-4"],
)
def test_combine_semantics(sets, how, expected):
    out = combine_masks(list(sets), how)
    assert out["w"].tolist() == [bool(b) for b in expected]
    assert all(s["w"].tolist() == before for s, before in zip(sets, [s["w"].tolist() for s in sets]))  # inputs untouched


def test_combine_rejects_bad_input():
    with pytest.raises(ValueError, match="different parameters"):
        combine_masks([A, {"v": A["w"]}], "union")
    with pytest.raises(ValueError, match="unknown combine"):
        combine_masks([A], "average")



def test_every_combine_value_has_a_strategy():
    values = typing.get_args(InstantSoup.model_fields["combine"].annotation)
    assert set(values) == set(COMBINES)
    assert all(COMBINES[v].name == v for v in values)
    assert COMBINES["union_levels"].learners == COMBINES["union_levels"].rounds == 1
    assert all(COMBINES[v].learners is None and COMBINES[v].rounds is None for v in ("union", "intersection", "vote"))


def test_combine_registry_refuses_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        COMBINES.add("union", Combine("union", "intersection"))
    assert COMBINES["union"].op == "union"


def test_strategies_cut_goals_and_learner_masks(micro_model):
    existing = soup.scope_masks(micro_model, ["blocks.*"], {})
    isp, issp = COMBINES["union"], COMBINES["union_levels"]
    assert isp.goals(0.5, 0.1, 0.6) == pytest.approx([0.55])
    assert issp.goals(0.3, 0.1, 0.6) == pytest.approx([0.4, 0.5, 0.6]) and issp.goals(0.3, 0.1, 0.6, [0.45]) == [0.45]
    (m,) = isp.learner_masks(micro_model, ["blocks.*"], [0.55], existing)
    assert masks_hash(m) == masks_hash(prune_masks(micro_model, ["blocks.*"], 0.55, "global", existing))
    sets = issp.learner_masks(micro_model, ["blocks.*"], [0.4, 0.6], existing)
    assert [round(mask_sparsity(s), 3) for s in sets] == [0.4, 0.6]
    rec = issp.record([0.4, 0.6], sets, issp.merge(sets))
    assert rec["union_equals_least_sparse"] is True and rec["learner_goal"] is None and rec["levels"] == [0.4, 0.6]
    assert isp.record([0.55], [m], m) == {"learner_goal": 0.55, "learner_sparsity": [mask_sparsity(m)]}
    assert isp.label(1, 0.55) == "learner 2" and issp.label(0, 0.4) == "level 0.400"


@pytest.mark.parametrize("levels", [[0.3, 0.5, 0.7], [0.7, 0.3, 0.5], [0.45]], ids=["ascending", "shuffled", "single"])
def test_union_levels_equals_least_sparse_mask(levels):
    g = torch.Generator().manual_seed(0)
    # integer magnitudes: many ties, which the stable ranking must still nest
    weights = {"a": torch.randint(-5, 6, (40, 30), generator=g).float(), "b": torch.randint(-5, 6, (500,), generator=g).float()}
    existing = magnitude_masks({k: torch.rand(v.shape, generator=g) for k, v in weights.items()}, 0.2)
    sets = level_masks(weights, levels, existing)
    order = sorted(range(len(levels)), key=lambda i: levels[i])
    for lo, hi in zip(order, order[1:]):  # nested: a higher level keeps a subset of a lower one
        assert all(bool((sets[lo][k] | ~sets[hi][k]).all()) for k in weights)
    least = magnitude_masks(weights, min(levels), "global", existing)
    assert masks_hash(combine_masks(sets, "union_levels")) == masks_hash(least)
    assert mask_sparsity(combine_masks(sets, "union_levels")) == pytest.approx(min(levels), abs=1e-3)


def test_round_target_and_levels():
    assert round_target(0.0, 0.1, 0.6) == pytest.approx(0.1)
    assert round_target(0.5, 0.1, 0.6) == pytest.approx(0.55)  # 10% of the remaining half
    assert round_target(0.58, 0.1, 0.6) == 0.6  # capped at the target
    assert default_levels(0.3, 0.6) == pytest.approx([0.4, 0.5, 0.6])



def test_rounds_needed():
    assert rounds_needed(0.0, 0.5, 0.9, 0.05, 50) == 3  # 0.5, 0.75, 0.875 (within 0.05 of 0.9)
    assert rounds_needed(0.0, 0.5, 0.9, 0.05, 2) == 2  # capped
    assert rounds_needed(0.9, 0.5, 0.9, 0.05, 50) == 0


def test_cap_sparsity_gives_back_largest_removed():
    w = {"w": torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4])}
    existing = {"w": torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)}
    combined = {"w": torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)}  # 6 of 8 removed
    capped = cap_sparsity(combined, w, 0.5, existing)["w"]
    # 4 removed: the existing one (0.2) and the smallest other removed ones (0.1, 0.3, 0.4)
    assert capped.tolist() == [False, True, True, False, True, False, True, False]


# ----------------------------------------------------------------------------- learners keep masks


def test_learner_training_keeps_masks_enforced(micro_model):
    from lotus_deploy.data import build_data
    from lotus_deploy.models import input_spec
    from lotus_deploy.recipe.base import DataConfig
    from lotus_deploy.train import TrainSpec

    data = build_data(DataConfig(kind="digits", train_subset=100, eval_subset=50, augment="none"), input_spec(micro_model))
    masks = prune_masks(micro_model, ["blocks.*"], 0.5, "global")
    before = {k: p.detach().clone() for k, p in micro_model.named_parameters()}
    spec = TrainSpec(epochs=1, lr=1e-2, warmup=0.0, schedule="constant", eval_every_epoch=False)
    idx = soup.fraction_indices(len(data.train), 0.5, seed=3)
    assert len(idx) == 50 and idx == soup.fraction_indices(len(data.train), 0.5, seed=3)
    seen = soup.train_on_fraction(micro_model, data, idx, spec, seed=3, batch_size=16, device=torch.device("cpu"), masks=masks)
    assert seen == 50
    assert soup.violations(micro_model, masks) == 0
    params = dict(micro_model.named_parameters())
    for k, m in masks.items():
        assert bool((params[k][~m] == 0).all())
        assert not torch.equal(params[k][m], before[k][m])  # the kept weights did train
