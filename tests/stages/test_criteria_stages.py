"""``criterion:`` in the stages: one sweep curve per criterion, wanda/sparsegpt one-shot, 2:4 and soup, validation."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def crit_run(tmp_path_factory):
    """train -> sweep (3 criteria, wanda's knee applied) -> wanda soup -> sparsegpt prune -> sparsegpt 2:4 -> bake."""
    from conftest import TINY_RECIPE

    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    stages = [
        {"kind": "finetune", "name": "train", "steps": 4, "lr": 2e-3},
        {"kind": "essential_sparsity", "sparsities": [0.2, 0.4], "criteria": ["magnitude", "wanda", "sparsegpt"],
         "knee_criterion": "wanda", "tolerance": 100, "apply": "knee", "calibration_images": 32},
        {"kind": "instant_soup", "sparsity": 0.5, "criterion": "wanda", "calibration_images": 16, "learners": 2,
         "data_fraction": 0.1, "step": 0.1, "finetune_steps": 1, "eval_rounds": False},
        {"kind": "magnitude_prune", "name": "obs", "sparsity": 0.6, "criterion": "sparsegpt", "calibration_images": 32},
        {"kind": "semi_structured", "criterion": "sparsegpt", "calibration_images": 32},
        {"kind": "bake"},
    ]
    return compress(parse_recipe({**TINY_RECIPE, "stages": stages}), out=tmp_path_factory.mktemp("runs") / "crit", quiet=True)


def metrics(run_dir, name):
    from lotus_deploy.files import read_json

    return next(e for e in read_json(run_dir / "manifest.json")["stages"] if e["name"] == name)["metrics"]


def test_sweep_gives_one_curve_per_criterion(crit_run):
    m = metrics(crit_run, "essential_sparsity")
    assert {n: c["criterion"] for n, c in m["curves"].items()} == {
        "scope": "wanda", "scope/magnitude": "magnitude", "scope/sparsegpt": "sparsegpt"}
    assert m["knee_criterion"] == "wanda" and m["knee"] == m["curves"]["scope"]["knee"] == 0.4
    assert m["evaluations"] == 1 + 2 * 3 and m["calibration_images"] == 32
    for name in m["curves"]:
        assert [r["target"] for r in m["table"] if r["curve"] == name] == [0.0, 0.2, 0.4]
    hashes = {r["curve"]: r["masks_hash"] for r in m["table"] if r["target"] == 0.4}
    assert len(set(hashes.values())) == 3  # the criteria choose different masks
    header = (crit_run / "stages" / "02_essential_sparsity" / "sweep.csv").read_text().splitlines()[0]
    assert "criterion" in header.split(",") and m["scope_sparsity"] == pytest.approx(0.4, abs=1e-3)


def test_wanda_soup_and_sparsegpt_stages_hit_their_targets_with_masks_kept(crit_run):
    import torch

    from lotus_deploy.prune.two_four import is_two_four
    from lotus_deploy.run import Run
    from lotus_deploy.scope import select_weights

    soup = metrics(crit_run, "instant_soup")
    assert soup["scope_sparsity"] == pytest.approx(0.5, abs=1e-3) and soup["violations"] == 0
    obs = metrics(crit_run, "obs")
    assert obs["criterion"] == "sparsegpt" and obs["reconstructed_layers"] == 8
    assert obs["scope_sparsity"] == pytest.approx(0.6, abs=1e-3) and obs["calibration_images"] == 32
    run = Run(crit_run)
    before, masks_before = run.load("obs", "cpu")
    after, masks = run.load("semi_structured", "cpu")
    linears = set(select_weights(after, ["blocks.*"]))
    ss = metrics(crit_run, "semi_structured")
    assert ss["criterion"] == "sparsegpt" and set(ss["two_four_layers"]) == linears and len(linears) == 8
    params = dict(after.named_parameters())
    for k in linears:
        assert is_two_four(params[k], 1) and bool((params[k][~masks[k]] == 0).all())
        assert bool((masks[k] <= masks_before[k]).all())  # 2:4 inside the earlier masks, which stay zero
    changed = [k for k in linears if not torch.equal(params[k], dict(before.named_parameters())[k] * masks[k])]
    assert changed, "sparsegpt 2:4 reconstructed no kept weight"


@pytest.mark.parametrize("stage, loc, match", [
    ({"kind": "magnitude_prune", "sparsity": 0.5, "criterion": "sparsegpt", "granularity": "per_row"}, "stages.0.magnitude_prune", "column block"),
    ({"kind": "magnitude_prune", "sparsity": 0.5, "criterion": "obs"}, "stages.0.criterion", "magnitude"),
    ({"kind": "essential_sparsity", "criteria": ["magnitude"], "knee_criterion": "wanda"}, "stages.0.essential_sparsity", "not among criteria"),
    ({"kind": "essential_sparsity", "criteria": ["wanda", "wanda"]}, "stages.0.essential_sparsity", "twice"),
    ({"kind": "essential_sparsity", "criteria": []}, "stages.0.criteria", "at least 1"),
    ({"kind": "instant_soup", "sparsity": 0.5, "criterion": "sparsegpt"}, "stages.0.criterion", "wanda"),
    ({"kind": "semi_structured", "criterion": "wanda", "calibration_images": 0}, "stages.0.calibration_images", "greater than 0"),
], ids=["sparsegpt-per-row", "unknown", "knee-criterion", "twice", "none", "soup-sparsegpt", "no-images"])
def test_recipe_validation_of_the_criterion_fields(tiny_recipe_dict, stage, loc, match):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    tiny_recipe_dict["stages"] = [stage]
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe(tiny_recipe_dict)
    assert [p.loc for p in e.value.problems] == [loc]


def test_recipe_defaults_keep_magnitude(tiny_recipe_dict):
    from lotus_deploy.recipe import parse_recipe

    tiny_recipe_dict["stages"] = [{"kind": "essential_sparsity"}, {"kind": "magnitude_prune", "sparsity": 0.3, "granularity": "per_row"},
                                  {"kind": "semi_structured"}]
    es, mp, ss = parse_recipe(tiny_recipe_dict).stages
    assert es.criteria == ["magnitude"] and es.knee_from == "magnitude" and es.calibration_images == 256
    assert mp.criterion == "magnitude" and mp.granularity == "per_row" and ss.criterion == "magnitude"
