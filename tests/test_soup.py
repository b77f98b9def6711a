"""instant_soup: mask combination, ISP reaching its target, enforced masks, union_levels, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lotus_deploy.masks import magnitude_masks, mask_sparsity, masks_hash
from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.stages import soup
from lotus_deploy.stages.soup import (
    cap_sparsity,
    combine_masks,
    default_levels,
    level_masks,
    round_target,
)

# ----------------------------------------------------------------------------- pure parts


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


def test_cap_sparsity_gives_back_largest_removed():
    w = {"w": torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4])}
    existing = {"w": torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)}
    combined = {"w": torch.tensor([0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)}  # 6 of 8 removed
    capped = cap_sparsity(combined, w, 0.5, existing)["w"]
    # 4 removed: the existing one (0.2) and the smallest other removed ones (0.1, 0.3, 0.4)
    assert capped.tolist() == [False, True, True, False, True, False, True, False]


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


# ----------------------------------------------------------------------------- learners keep masks


def test_learner_training_keeps_masks_enforced(micro_model):
    from lotus_deploy.data import build_data
    from lotus_deploy.models import input_spec
    from lotus_deploy.recipe.base import DataConfig
    from lotus_deploy.stages.prune import prune_masks
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
    assert not (stage_dir / soup.ROUND_FILE).exists()  # the round checkpoint is removed when done


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
    ckpt = tmp_path / "crashed" / "stages" / "03_instant_soup" / soup.ROUND_FILE
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
