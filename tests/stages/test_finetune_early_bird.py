"""The finetune stage's early_bird option: checks, drawing, stopping, the saved ticket."""

from __future__ import annotations

import json

import pytest

from lotus_deploy.masks import masks_hash


def _run_finetune(tiny_recipe_dict, tmp_path, early_bird, **ft):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    tiny_recipe_dict["stages"] = [{"kind": "finetune", "name": "train", "lr": 2e-3, "early_bird": early_bird, **ft}]
    run = compress(parse_recipe(tiny_recipe_dict), out=tmp_path / "run", quiet=True)
    entry = json.loads((run / "manifest.json").read_text())["stages"][0]
    return run, entry


def test_finetune_stops_at_ticket_and_saves_it(tiny_recipe_dict, tmp_path):
    from lotus_deploy.files import load_tensors
    from lotus_deploy.prune.magnitude import prune_masks
    from lotus_deploy.run import Run

    # threshold 1.0: any two masks are closer than that, so the ticket is drawn when the window fills
    eb = {"sparsity": 0.5, "every": 2, "window": 3, "threshold": 1.0, "stop": True}
    run, entry = _run_finetune(tiny_recipe_dict, tmp_path, eb, steps=12)
    m = entry["metrics"]["early_bird"]
    assert m["drawn"]["check"] == 3 and m["drawn"]["step"] == 6
    assert m["stopped"] and m["steps_trained"] == 6  # stopped at the drawing check, not after 12 steps
    assert [c["step"] for c in m["checks"]] == [2, 4, 6]
    assert all(len(c["distances"]) == min(i, 2) for i, c in enumerate(m["checks"]))
    stage_dir = run / "stages" / "01_train"
    ticket = load_tensors(stage_dir / "early_bird_masks.safetensors")
    assert masks_hash(ticket) == m["ticket_masks_hash"]
    assert (stage_dir / "early_bird.png").read_bytes()[:4] == b"\x89PNG"
    assert {"early_bird_masks", "early_bird_png"} <= set(entry["artifacts"])
    # the model stopped at the check: a magnitude prune of it draws exactly the ticket
    model, _ = Run(run).load("train")
    assert masks_hash(prune_masks(model, ["blocks.*"], 0.5, "global")) == m["ticket_masks_hash"]
    assert m["final_distance"] == 0.0


def test_finetune_epoch_checks_record_without_stopping(tiny_recipe_dict, tmp_path):
    eb = {"sparsity": 0.3, "window": 2, "threshold": 1.0, "scope": ["blocks.*.mlp.*"]}
    run, entry = _run_finetune(tiny_recipe_dict, tmp_path, eb, steps=14)  # 200 images / 32 = 7 steps per epoch
    m = entry["metrics"]["early_bird"]
    assert [c["epoch"] for c in m["checks"]] == [1.0, 2.0] and [c["step"] for c in m["checks"]] == [7, 14]
    assert all("eval_top1" in c for c in m["checks"])
    assert m["drawn"]["check"] == 2 and not m["stopped"] and m["steps_trained"] == 14
    assert m["every"] == "epoch"


def test_early_bird_config_validation(tiny_recipe_dict):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    tiny_recipe_dict["stages"] = [{"kind": "finetune", "steps": 2, "early_bird": {"sparsity": 0.5, "every": 0, "window": 1}}]
    with pytest.raises(RecipeError) as e:
        parse_recipe(tiny_recipe_dict)
    locs = {p.loc for p in e.value.problems}
    assert "stages.0.early_bird.window" in locs and any(l.startswith("stages.0.early_bird.every") for l in locs)
