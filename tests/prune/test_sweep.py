"""The essential-sparsity sweep (never compounds, restores the weights) and its knees on synthetic curves."""

from __future__ import annotations

import copy

import pytest
import torch

from lotus_deploy.masks import magnitude_masks, masks_hash
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.sweep import kneedle, knees, sweep, tolerance_knee
from lotus_deploy.scope import DEFAULT_SCOPE, select_weights


def _zero_pattern(model, scope=DEFAULT_SCOPE):
    return {k: p.detach() != 0 for k, p in select_weights(model, scope).items()}


def test_sweep_points_do_not_compound(micro_model):
    """Each point's masks and sparsity equal a fresh one-shot prune of the dense weights."""
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    seen = []

    def evaluate_fn():
        seen.append(_zero_pattern(micro_model))
        return {"top1": 0.0, "seconds": 0.0}

    points = [0.1, 0.3, 0.5, 0.3, 0.0]
    rows = sweep(micro_model, DEFAULT_SCOPE, points, evaluate_fn)
    assert [r["target"] for r in rows] == points
    for s, row, pattern in zip(points, rows, seen):
        fresh = prune_masks(copy.deepcopy(micro_model), DEFAULT_SCOPE, s, "global")
        assert row["masks_hash"] == masks_hash(fresh)
        assert masks_hash(pattern) == masks_hash(fresh)  # what was evaluated is the fresh prune
        assert row["sparsity"] == pytest.approx(s, abs=1e-4)
    assert rows[1]["masks_hash"] == rows[3]["masks_hash"]  # 0.3 after 0.5 is still 0.3 from dense
    after = micro_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit


def test_sweep_restores_weights_when_evaluation_fails(micro_model):
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}

    def boom():
        raise RuntimeError("eval failed")

    with pytest.raises(RuntimeError, match="eval failed"):
        sweep(micro_model, DEFAULT_SCOPE, [0.5], boom)
    assert all(torch.equal(before[k], v) for k, v in micro_model.state_dict().items())


def test_sweep_keeps_existing_masks(micro_model):
    weights = select_weights(micro_model, DEFAULT_SCOPE)
    existing = magnitude_masks({k: torch.randn(p.shape) for k, p in weights.items()}, 0.4)  # unrelated to magnitudes
    seen = []
    rows = sweep(micro_model, DEFAULT_SCOPE, [0.2, 0.6], lambda: seen.append(_zero_pattern(micro_model)) or {"top1": 0.0, "seconds": 0.0}, existing=existing)
    assert masks_hash(seen[0]) == masks_hash(existing)  # below the existing sparsity: existing alone
    assert rows[1]["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert all(bool((~seen[1][k] | existing[k]).all()) for k in existing)  # subset of existing


def test_sweep_rejects_empty_scope(micro_model):
    with pytest.raises(ValueError, match="selects no prunable weights"):
        sweep(micro_model, ["nothing.*"], [0.1], lambda: {})


# ----------------------------------------------------------------------------- knees (synthetic curves)


XS = [round(0.05 * i, 2) for i in range(11)]


def _cliff(at: float, slope: float = 60.0, top: float = 80.0):
    return [top if x <= at + 1e-9 else top - slope * (x - at) for x in XS]


@pytest.mark.parametrize(
    "ys, tol, knee",
    [
        (_cliff(0.3), 1.0, 0.3),
        (_cliff(0.3, slope=15.0), 1.0, 0.35),  # 0.35 drops 0.75 points: still within 1
        ([80 - 1.5 * x for x in XS], 1.0, 0.5),  # everything within tolerance
        ([80.0, 78.0] + [70.0] * 9, 1.0, 0.0),  # nothing but dense
        ([80, 80, 79.5, 78.5, 79.2, 77, 75, 70, 60, 50, 40], 1.0, 0.2),
        ([80, 80, 79.5, 78.5, 79.2, 77, 75, 70, 60, 50, 40], 0.5, 0.1),
        ([80, 80, 79.5, 78.5, 79.2, 77, 75, 70, 60, 50, 40], 1.5, 0.2),  # 0.15 drops 1.5: within; 0.2 (0.8) still largest
    ],
    ids=["cliff", "gentle-cliff", "all-within", "only-dense", "noisy", "noisy-tight", "noisy-loose"],
)
def test_tolerance_knee(ys, tol, knee):
    i = tolerance_knee(XS, ys, ys[0], tol)
    assert XS[i] == knee


def test_tolerance_knee_is_largest_within_not_first_failure():
    ys = [80, 80, 78, 79.5, 70]  # 0.1 fails, 0.15 is back within tolerance
    xs = [0.0, 0.05, 0.1, 0.15, 0.2]
    assert xs[tolerance_knee(xs, ys, 80, 1.0)] == 0.15
    assert tolerance_knee(xs[1:], [70, 70, 70, 70], 80, 1.0) is None


@pytest.mark.parametrize(
    "ys, knee",
    [
        (_cliff(0.3), 0.3),
        (_cliff(0.15), 0.15),
        ([80 - 150 * x**3 for x in XS], 0.3),  # smooth concave bend
        ([80 - 10 * x for x in XS], None),  # straight: no bend
        ([80 - 60 * (1 - (1 - 2 * x) ** 3) for x in XS], None),  # convex (drops first, flattens)
    ],
    ids=["cliff-0.3", "cliff-0.15", "cubic", "linear", "convex"],
)
def test_kneedle_concave(ys, knee):
    i = kneedle(XS, ys)
    assert (XS[i] if i is not None else None) == knee


def test_kneedle_convex_and_order_invariance():
    ys = [80 - 60 * (1 - (1 - 2 * x) ** 3) for x in XS]
    i = kneedle(XS, ys, curve="convex")
    assert i is not None and 0.05 <= XS[i] <= 0.25
    perm = [3, 0, 10, 7, 1, 5, 9, 2, 8, 4, 6]
    j = kneedle([XS[p] for p in perm], [_cliff(0.3)[p] for p in perm])
    assert XS[perm[j]] == 0.3  # index refers to the caller's order
    assert kneedle([0.0, 0.5], [80, 70]) is None



def test_knees_are_keyed_by_the_knee_words():
    from lotus_deploy.recipe.base import KNEE_VALUES

    k = knees(XS, _cliff(0.3), 80.0, 1.0)
    assert k == {"knee": 0.3, "knee_top1": 80.0, "knee_curvature": 0.3, "knee_curvature_top1": 80.0}
    assert {w for w in k if not w.endswith("_top1")} == set(KNEE_VALUES)
    straight = [80 - 10 * x for x in XS]
    assert knees(XS, straight, 80.0, 1.0)["knee_curvature"] is None and knees(XS, straight, 80.0, 1.0)["knee_curvature_top1"] is None
