"""The instant_soup stage: config, ISP reaching its target, union_levels, resume from a round checkpoint."""

from __future__ import annotations

import copy
import json

import pytest

from lotus_deploy.masks import mask_sparsity
from lotus_deploy.prune.soup import ROUND_FILE
from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.stages import soup


def test_config_validation():
    with pytest.raises(ValueError, match="only used with combine: union_levels"):
        InstantSoup(sparsity=0.6, levels=[0.5])
    assert InstantSoup(sparsity="knee").makes_masks


@pytest.mark.parametrize("backbone_lr", [None, 3e-5], ids=["one-lr", "backbone-lr"])
def test_round_lr_scale_scales_rounds_only(backbone_lr):
    cfg = InstantSoup(sparsity=0.6, lr=1e-3, backbone_lr=backbone_lr, round_lr_scale=0.1)
    spec = soup._Ctx(cfg, state=None, target=0.6, base_seed=0, bs=8).spec(1.0)
    assert spec.lr == pytest.approx(1e-4) and spec.schedule == "constant" and spec.warmup == 0.0
    assert spec.backbone_lr == (None if backbone_lr is None else pytest.approx(3e-6))
    assert cfg.lr == 1e-3  # the config (and so the final fine-tune, which reads cfg.lr) is untouched
    with pytest.raises(ValueError):
        InstantSoup(sparsity=0.6, round_lr_scale=0)


# ----------------------------------------------------------------------------- the stage


def _recipe(tiny_recipe_dict, **soup_cfg):
    tiny_recipe_dict["stages"] = [
        {"kind": "finetune", "name": "train", "steps": 3, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.2},
        {"kind": "instant_soup", "sparsity": 0.6, "learners": 2, "data_fraction": 0.2, "step": 0.2,
         "finetune_steps": 2, "eval_images": 40, **soup_cfg},
    ]
    from lotus_deploy.recipe import parse_recipe

    return parse_recipe(tiny_recipe_dict)


def _soup_entry(run):
    return json.loads((run / "manifest.json").read_text())["stages"][-1]


@pytest.mark.parametrize("combine", ["union", "intersection", "vote"])
def test_isp_reaches_target(tiny_recipe_dict, tmp_path, combine):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.run import Run

    run = compress(_recipe(tiny_recipe_dict, combine=combine), out=tmp_path / "run", quiet=True)
    entry = _soup_entry(run)
    m = entry["metrics"]
    assert abs(m["scope_sparsity"] - 0.6) <= 0.005
    _, masks = Run(run).load("final")
    assert abs(mask_sparsity(masks) - 0.6) <= 0.005
    rounds = m["rounds"]
    assert m["n_rounds"] == len(rounds) >= 2 and m["rounds_converged"]
    assert m["start_sparsity"] == pytest.approx(0.2, abs=1e-3)
    assert 0.6 - m["soup_sparsity"] <= 0.05 + 1e-9  # rounds stopped within stop_within
    for r in rounds:
        assert r["start_sparsity"] < r["sparsity"] <= 0.6 + 1e-9
        assert len(r["learner_top1"]) == 2 and len(r["learner_sparsity"]) == 2
        assert "combined_top1" in r and "main_top1" in r
        if combine == "union":
            assert r["sparsity"] <= min(r["learner_sparsity"]) + 1e-9  # union keeps more than any learner
        if combine == "intersection" and "capped_from" not in r:
            assert r["sparsity"] >= max(r["learner_sparsity"]) - 1e-9
    assert [r["sparsity"] for r in rounds] == sorted(r["sparsity"] for r in rounds)
    assert m["violations"] == 0
    n = len(rounds)
    assert m["images_seen"]["learners"] == n * 2 * 40 and m["images_seen"]["main"] == n * 40  # 20% of 200 images
    assert m["images_seen"]["finetune"] == 2 * 32
    stage_dir = run / "stages" / "03_instant_soup"
    assert (stage_dir / "rounds.csv").is_file() and (stage_dir / "rounds.png").is_file()
    assert not (stage_dir / ROUND_FILE).exists()  # the round checkpoint is removed when done


def test_intersection_overshoot_is_capped(tiny_recipe_dict, tmp_path):
    from lotus_deploy.pipeline import compress

    # step 0.5 from 0.2 asks every learner for 0.6 = the target; their intersection removes more
    run = compress(_recipe(tiny_recipe_dict, combine="intersection", step=0.5, learners=3), out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    r = m["rounds"][0]
    assert r["capped_from"] > 0.6 and r["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert m["n_rounds"] == 1 and m["remainder_pruned"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("prune_remainder, final", [(True, 0.6), (False, 0.3)], ids=["remainder", "soup-only"])
def test_union_levels_collapses_to_least_sparse_level(tiny_recipe_dict, tmp_path, prune_remainder, final):
    from lotus_deploy.pipeline import compress

    cfg = dict(combine="union_levels", levels=[0.3, 0.45, 0.6], prune_remainder=prune_remainder)
    run = compress(_recipe(tiny_recipe_dict, **cfg), out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    assert m["n_rounds"] == 1 and m["union_equals_least_sparse"] is True
    assert m["level_sparsity"] == pytest.approx([0.3, 0.45, 0.6], abs=1e-3)
    assert m["soup_sparsity"] == pytest.approx(0.3, abs=1e-3)  # the union is the 0.3 mask, not 0.6
    assert m["scope_sparsity"] == pytest.approx(final, abs=1e-3)
    assert m["remainder_pruned"] == pytest.approx(final - 0.3, abs=1e-3)
    assert len(m["rounds"][0]["learner_top1"]) == 3  # one accuracy per level
    assert m["images_seen"]["learners"] == 40  # one model on 20% of the data


def _crash_in_round(monkeypatch, index: int):
    """Make ``soup.play_round`` raise in round ``index`` (0-based); returns the real function."""
    real = soup.play_round

    def crash(ctx, r, current):
        if r == index:
            raise RuntimeError(f"simulated crash in round {index + 1}")
        return real(ctx, r, current)

    monkeypatch.setattr(soup, "play_round", crash)
    return real


def test_resume_in_the_middle_of_isp(tiny_recipe_dict, tmp_path, monkeypatch):
    from lotus_deploy.pipeline import compress

    recipe = _recipe(tiny_recipe_dict)
    clean = compress(recipe, out=tmp_path / "clean", quiet=True)
    ref = _soup_entry(clean)["metrics"]
    assert ref["n_rounds"] >= 3

    real = _crash_in_round(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compress(recipe, out=tmp_path / "crashed", quiet=True)
    entry = _soup_entry(tmp_path / "crashed")
    assert entry["status"] == "failed"
    ckpt = tmp_path / "crashed" / "stages" / "03_instant_soup" / ROUND_FILE
    assert ckpt.is_file()

    monkeypatch.setattr(soup, "play_round", real)
    resumed = compress(recipe, out=tmp_path / "crashed", resume=True, quiet=True)
    m = _soup_entry(resumed)["metrics"]
    assert m["resumed_after_round"] == 1
    assert m["final_masks_hash"] == ref["final_masks_hash"]
    assert [r["combined_masks_hash"] for r in m["rounds"]] == [r["combined_masks_hash"] for r in ref["rounds"]]
    assert m["images_seen"] == ref["images_seen"]
    assert not ckpt.exists()


def test_round_checkpoint_of_another_config_is_ignored(tiny_recipe_dict, tmp_path, monkeypatch):
    from lotus_deploy.pipeline import compress

    real = _crash_in_round(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        compress(_recipe(copy.deepcopy(tiny_recipe_dict)), out=tmp_path / "run", quiet=True)
    monkeypatch.setattr(soup, "play_round", real)
    run = compress(_recipe(tiny_recipe_dict, step=0.25), out=tmp_path / "run", resume=True, quiet=True)
    m = _soup_entry(run)["metrics"]
    assert m["resumed_after_round"] is None and abs(m["scope_sparsity"] - 0.6) <= 0.005
