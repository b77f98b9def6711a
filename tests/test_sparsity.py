"""essential_sparsity: non-compounding sweep, knee detection, `sparsity: knee` resolution."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch

from lotus_deploy.masks import magnitude_masks, mask_sparsity, masks_hash
from lotus_deploy.recipe.stages import EssentialSparsity
from lotus_deploy.scope import DEFAULT_SCOPE, select_weights
from lotus_deploy.stages.prune import prune_masks
from lotus_deploy.stages.sparsity import (
    kneedle,
    resolve_sparsity,
    sweep,
    tolerance_knee,
)

# ----------------------------------------------------------------------------- sweep (pure)


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


# ----------------------------------------------------------------------------- config and recipe


def test_config_always_measures_dense_and_sorts():
    cfg = EssentialSparsity(sparsities=[0.5, 0.1, 0.1])
    assert cfg.sparsities == [0.0, 0.1, 0.5]
    assert EssentialSparsity().sparsities == XS
    assert not EssentialSparsity().makes_masks and EssentialSparsity(apply="tolerance_knee").makes_masks
    with pytest.raises(ValueError, match="taken"):
        EssentialSparsity(scopes={"scope": ["blocks.*"]})


@pytest.mark.parametrize(
    "stages, loc",
    [
        ([{"kind": "magnitude_prune", "sparsity": "knee"}], "stages.0.sparsity"),
        ([{"kind": "finetune", "steps": 2, "early_bird": {"sparsity": "knee_curvature"}}], "stages.0.early_bird.sparsity"),
        ([{"kind": "magnitude_prune", "sparsity": "knee"}, {"kind": "essential_sparsity"}], "stages.0.sparsity"),
    ],
    ids=["prune-without-sweep", "early-bird-without-sweep", "sweep-after"],
)
def test_recipe_knee_needs_a_sweep_before(tiny_recipe_dict, stages, loc):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    tiny_recipe_dict["stages"] = stages
    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_recipe_dict)
    assert [p.loc for p in e.value.problems] == [loc]


def test_recipe_knee_words(tiny_recipe_dict):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    tiny_recipe_dict["stages"] = [{"kind": "essential_sparsity"}, {"kind": "magnitude_prune", "sparsity": "knee_curvature"}]
    assert parse_recipe(tiny_recipe_dict).stages[1].sparsity == "knee_curvature"
    tiny_recipe_dict["stages"][1]["sparsity"] = "kneee"
    with pytest.raises(RecipeError, match="stages.1.sparsity"):
        parse_recipe(tiny_recipe_dict)


def _fake_state(curves):
    log = types.SimpleNamespace(warnings=[])
    log.warning = log.warnings.append
    return types.SimpleNamespace(stage_metrics=lambda kind: {"curves": curves} if curves else None, log=log)


def test_resolve_sparsity_picks_curve_by_scope():
    curves = {
        "scope": {"scope": ["blocks.*"], "tolerance_knee": 0.3, "curvature_knee": 0.35},
        "mlp": {"scope": ["blocks.*.mlp.*"], "tolerance_knee": 0.45, "curvature_knee": None},
    }
    st = _fake_state(curves)
    assert resolve_sparsity(0.25, st) == (0.25, {})
    assert resolve_sparsity("knee", st, ["blocks.*"])[0] == 0.3
    assert resolve_sparsity("knee_curvature", st, ["blocks.*"])[0] == 0.35
    s, info = resolve_sparsity("knee", st, ["blocks.*.mlp.*"])
    assert s == 0.45 and info["sweep_curve"] == "mlp"
    with pytest.raises(ValueError, match="no curvature knee"):
        resolve_sparsity("knee_curvature", st, ["blocks.*.mlp.*"])
    assert resolve_sparsity("knee", st, ["blocks.0.*"])[0] == 0.3 and st.log.warnings  # fallback, warned
    with pytest.raises(ValueError, match="needs a finished essential_sparsity"):
        resolve_sparsity("knee", _fake_state(None))


# ----------------------------------------------------------------------------- the stage


def _read_manifest(run):
    return {e["name"]: e for e in json.loads((run / "manifest.json").read_text())["stages"]}


def test_stage_sweeps_scopes_and_feeds_knee(tiny_recipe_dict, tmp_path):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import Run

    tiny_recipe_dict["stages"] = [
        {"kind": "finetune", "name": "train", "steps": 4, "lr": 2e-3},
        {"kind": "essential_sparsity", "sparsities": [0.2, 0.5], "scopes": {"mlp": ["blocks.*.mlp.*"]}, "tolerance": 100.0},
        {"kind": "magnitude_prune", "sparsity": "knee", "scope": ["blocks.*.mlp.*"]},
    ]
    run = compress(parse_recipe(tiny_recipe_dict), out=tmp_path / "run", quiet=True)
    m = _read_manifest(run)
    sw = m["essential_sparsity"]
    stage_dir = run / "stages" / "02_essential_sparsity"
    rows = (stage_dir / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + (dense + 2 points) per curve
    assert (stage_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mt = sw["metrics"]
    assert mt["evaluations"] == 1 + 2 * 2  # the dense evaluation is shared by the curves
    assert mt["cost_ratio"] >= 1.0 and mt["sweep_wall_s"] > 0
    assert set(mt["curves"]) == {"scope", "mlp"} and mt["knee"] == 0.5  # tolerance 100: everything qualifies
    for r in mt["table"]:
        assert r["sparsity"] == pytest.approx(r["target"], abs=1e-3)
    assert "model" not in sw["artifacts"]  # apply: none leaves the model as it was
    pr = m["magnitude_prune"]["metrics"]
    assert pr["sparsity_from"] == "knee" and pr["sweep_curve"] == "mlp"
    assert pr["scope_sparsity"] == pytest.approx(mt["curves"]["mlp"]["tolerance_knee"], abs=1e-3)
    # the sweep did not change the model: the pruned model equals a fresh prune of the trained one
    trained, _ = Run(run).load("train")
    fresh = prune_masks(trained, ["blocks.*.mlp.*"], 0.5, "global")
    _, masks = Run(run).load("final")
    assert masks_hash(masks) == masks_hash(fresh)


def test_stage_apply_knee_prunes(tiny_recipe_dict, tmp_path):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import Run

    tiny_recipe_dict["stages"] = [
        {"kind": "essential_sparsity", "sparsities": [0.1, 0.3], "tolerance": 100.0, "apply": "tolerance_knee"},
        {"kind": "bake"},  # needs masks: the sweep made them
    ]
    run = compress(parse_recipe(tiny_recipe_dict), out=tmp_path / "run", quiet=True)
    mt = _read_manifest(run)["essential_sparsity"]["metrics"]
    assert mt["applied_sparsity"] == 0.3 and mt["scope_sparsity"] == pytest.approx(0.3, abs=1e-3)
    model, masks = Run(run).load("essential_sparsity")
    assert mask_sparsity(masks) == pytest.approx(0.3, abs=1e-3)
    assert Run(run).variants()["dense"]["name"] == "initial"  # the pruning sweep ends the dense variant


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
@pytest.mark.parametrize("with_existing", [False, True], ids=["fresh", "existing"])
def test_ranked_masks_equal_magnitude_masks(granularity, with_existing):
    from lotus_deploy.stages.sparsity import ranked_masks

    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randint(-4, 5, (30, 20), generator=g).float(), "b": torch.randn(300, generator=g)}  # ties in a
    existing = magnitude_masks({k: torch.rand(v.shape, generator=g) for k, v in w.items()}, 0.3) if with_existing else None
    at = ranked_masks(w, granularity, existing)
    for s in [0.0, 0.1, 0.25, 0.5, 0.9, 0.5]:
        assert masks_hash(at(s)) == masks_hash(magnitude_masks(w, s, granularity, existing))
