"""The essential_sparsity stage: config, knee words in recipes, `sparsity: knee` resolution, runs."""

from __future__ import annotations

import json
import types

import pytest

from lotus_deploy.masks import mask_sparsity, masks_hash
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.recipe.stages import EssentialSparsity
from lotus_deploy.stages.common import resolve_sparsity

XS = [round(0.05 * i, 2) for i in range(11)]


def test_config_always_measures_dense_and_sorts():
    cfg = EssentialSparsity(sparsities=[0.5, 0.1, 0.1])
    assert cfg.sparsities == [0.0, 0.1, 0.5]
    assert EssentialSparsity().sparsities == XS
    assert not EssentialSparsity().makes_masks and EssentialSparsity(apply="knee").makes_masks
    with pytest.raises(ValueError, match="taken"):
        EssentialSparsity(scopes={"scope": ["blocks.*"]})


@pytest.mark.parametrize(
    "stages, loc",
    [
        ([{"kind": "magnitude_prune", "sparsity": "knee"}], "stages.0.sparsity"),
        ([{"kind": "finetune", "steps": 2, "early_bird": {"sparsity": "knee_curvature"}}], "stages.0.early_bird.sparsity"),
        ([{"kind": "magnitude_prune", "sparsity": "knee"}, {"kind": "essential_sparsity"}], "stages.0.sparsity"),
        ([{"kind": "instant_soup", "sparsity": 0.5, "start": "knee"}], "stages.0.start"),
    ],
    ids=["prune-without-sweep", "early-bird-without-sweep", "sweep-after", "soup-start-without-sweep"],
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
        "scope": {"scope": ["blocks.*"], "knee": 0.3, "knee_curvature": 0.35},
        "mlp": {"scope": ["blocks.*.mlp.*"], "knee": 0.45, "knee_curvature": None},
    }
    st = _fake_state(curves)
    assert resolve_sparsity(0.25, st) == (0.25, {})
    assert resolve_sparsity("knee", st, ["blocks.*"])[0] == 0.3
    assert resolve_sparsity("knee_curvature", st, ["blocks.*"])[0] == 0.35
    s, info = resolve_sparsity("knee", st, ["blocks.*.mlp.*"])
    assert s == 0.45 and info["sweep_curve"] == "mlp"
    with pytest.raises(ValueError, match="found no such knee"):
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
    assert pr["scope_sparsity"] == pytest.approx(mt["curves"]["mlp"]["knee"], abs=1e-3)
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
        {"kind": "essential_sparsity", "sparsities": [0.1, 0.3], "tolerance": 100.0, "apply": "knee"},
        {"kind": "bake"},  # needs masks: the sweep made them
    ]
    run = compress(parse_recipe(tiny_recipe_dict), out=tmp_path / "run", quiet=True)
    mt = _read_manifest(run)["essential_sparsity"]["metrics"]
    assert mt["applied_sparsity"] == 0.3 and mt["scope_sparsity"] == pytest.approx(0.3, abs=1e-3)
    model, masks = Run(run).load("essential_sparsity")
    assert mask_sparsity(masks) == pytest.approx(0.3, abs=1e-3)
    assert Run(run).variants()["dense"]["name"] == "initial"  # the pruning sweep ends the dense variant
