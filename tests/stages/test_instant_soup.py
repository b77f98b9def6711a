"""The instant_soup stage: config, ISP reaching its target as its authors run it (one main-model
optimizer and schedule, learners warming up from zero, main_fraction, finetune_epochs), union_levels,
resume from a round checkpoint."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest

from lotus_deploy.masks import mask_sparsity
from lotus_deploy.prune.soup import ROUND_FILE
from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.stages import soup


def test_config_validation():
    with pytest.raises(ValueError, match="only used with combine: union_levels"):
        InstantSoup(sparsity=0.6, levels=[0.5])
    assert InstantSoup(sparsity="knee").makes_masks


@pytest.mark.parametrize("field, hint", [("round_lr_scale", "lower lr / backbone_lr"), ("finetune_warmup", "use warmup")],
                         ids=["round_lr_scale", "finetune_warmup"])
def test_removed_fields_say_what_replaced_them(field, hint):
    with pytest.raises(ValueError, match=f"{field}: removed.*{hint}"):
        InstantSoup(sparsity=0.6, **{field: 0.1})


def test_a_bare_recipe_gets_the_authors_protocol(tiny_recipe_dict):
    from lotus_deploy.recipe import parse_recipe

    tiny_recipe_dict["train"] = {}  # the shipped train: defaults
    tiny_recipe_dict["stages"] = [{"kind": "instant_soup", "sparsity": 0.5}]
    cfg = parse_recipe(tiny_recipe_dict).stages[0]
    assert (cfg.learners, cfg.data_fraction, cfg.step, cfg.main_fraction, cfg.start) == (5, 0.1, 0.1, 0.5, "input")
    assert (cfg.grad_clip, cfg.warmup, cfg.schedule, cfg.finetune_epochs) == (1.0, 0.1, "cosine", 1.0)


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
    # planned: 0.2 -> 0.36 -> 0.488 -> 0.5904 (within 0.05 of 0.6): 3 rounds, whatever the learners do
    assert m["n_rounds"] == m["planned_rounds"] == len(rounds) == 3
    assert [r["planned_start"] for r in rounds] == pytest.approx([0.2, 0.36, 0.488], abs=1e-3)
    assert m["start_sparsity"] == pytest.approx(0.2, abs=1e-3)
    for r in rounds:
        assert r["start_sparsity"] < r["sparsity"] <= r["learner_goal"] + 1e-3  # no round passes its goal
        assert len(r["learner_top1"]) == 2 and len(r["learner_sparsity"]) == 2
        assert "combined_top1" in r and "main_top1" in r
        if combine == "union":
            assert r["sparsity"] <= min(r["learner_sparsity"]) + 1e-9  # union keeps more than any learner
        else:  # intersection / vote: at least as sparse as the goal, capped back to it (to a weight)
            assert r["sparsity"] == pytest.approx(r["learner_goal"], abs=1e-3)
    assert [r["sparsity"] for r in rounds] == sorted(r["sparsity"] for r in rounds)
    assert m["remainder_pruned"] == pytest.approx(0.6 - m["soup_sparsity"], abs=1e-3)
    assert m["violations"] == 0
    # learners: 20% of 200 images each; main model: main_fraction 0.5 of 200 (not data_fraction); fine-tune 2 x 32
    assert m["images_seen"] == {"learners": 3 * 2 * 40, "main": 3 * 100, "finetune": 2 * 32, "total": 240 + 300 + 64}
    assert m["images_planned"] == m["images_seen"]
    assert [(r["learner_images"], r["main_images"]) for r in rounds] == [(80, 100)] * 3
    assert all(r["round_s"] >= r["learners_s"] + r["main_s"] - 1e-6 > 0 for r in rounds)
    assert m["wall_s"]["rounds"] == pytest.approx(sum(r["round_s"] for r in rounds))
    stage_dir = run / "stages" / "03_instant_soup"
    header = (stage_dir / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"learner_images", "main_images", "round_s", "main_step", "main_lr"} <= set(header)
    assert (stage_dir / "rounds.png").is_file()
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
    assert m["schedule"]["total_steps"] == m["schedule"]["main_steps_taken"] == 4 + 2  # one main round + the fine-tune


# ----------------------------------------------------------------------------- the authors' protocol


@pytest.fixture
def adamw_steps(monkeypatch):
    """Every AdamW step of the test as (optimizer number, each group's lr, Adam's step counter of its first parameter)."""
    import torch

    calls: list[tuple[int, list[float], float]] = []
    numbers = itertools.count()
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if not hasattr(self, "_spy_number"):
            self._spy_number = next(numbers)  # id() can be reused once an optimizer is freed
        out = real(self, *args, **kwargs)
        first = self.param_groups[0]["params"][0]
        calls.append((self._spy_number, [g["lr"] for g in self.param_groups], float(self.state[first]["step"])))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def _by_optimizer(calls) -> dict[int, list[tuple[list[float], float]]]:
    out: dict[int, list] = {}
    for number, lrs, adam_step in calls:
        out.setdefault(number, []).append((lrs, adam_step))
    return out


def test_main_model_keeps_one_optimizer_and_one_schedule(tiny_recipe_dict, tmp_path, adamw_steps):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.schedule import Schedule

    lr, backbone_lr = 2e-3, 5e-4
    run = compress(_recipe(tiny_recipe_dict, lr=lr, backbone_lr=backbone_lr, warmup=0.3, finetune_steps=5),
                   out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    sched = m["schedule"]
    assert sched["total_steps"] == 3 * 4 + 5 == sched["main_steps_taken"]  # 3 rounds x ceil(100 / 32) + fine-tune
    assert sched["warmup_steps"] == round(0.3 * 17) and sched["kind"] == "cosine"
    main = [steps for steps in _by_optimizer(adamw_steps).values() if len(steps) == sched["total_steps"]]
    assert len(main) == 1, "exactly one optimizer takes every main-model step, rounds and fine-tune"
    schedule = Schedule(sched["total_steps"], sched["warmup_steps"], "cosine")
    for i, (lrs, adam_step) in enumerate(main[0]):
        f = schedule.factor(i)
        assert max(lrs) == pytest.approx(lr * f, rel=1e-12) and min(lrs) == pytest.approx(backbone_lr * f, rel=1e-12)
        assert adam_step == i + 1  # Adam's state carries over from round to round and into the fine-tune
    assert [r["main_step"] for r in m["rounds"]] == [4, 8, 12]
    assert m["rounds"][0]["main_lr"] == pytest.approx(lr * schedule.factor(3))


def test_learners_warm_up_from_zero(tiny_recipe_dict, tmp_path, adamw_steps):
    from lotus_deploy.pipeline import compress

    lr = 2e-3
    run = compress(_recipe(tiny_recipe_dict, lr=lr, backbone_lr=lr, data_fraction=0.5), out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    steps = m["schedule"]["learner_steps"]
    assert steps == math.ceil(100 / 32) == 4  # the dense fine-tune takes 3 steps, the main model 3 x 4 + 2
    learners = [s for s in _by_optimizer(adamw_steps).values() if len(s) == steps]
    assert len(learners) == 2 * m["n_rounds"]  # a fresh AdamW per learner
    for s in learners:
        assert [lrs[0] for lrs, _ in s] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4, lr])  # linear from ~0 to the peak
        assert [adam_step for _, adam_step in s] == [1, 2, 3, 4]


@pytest.mark.parametrize("main_fraction, finetune, ft_steps, ft_images",
                         [(0.5, {"finetune_epochs": 2.0}, 14, 400), (1.0, {"finetune_epochs": 0.5}, 4, 128),
                          (0.25, {"budget_images": 1000}, (1000 - 3 * 80 - 3 * 50) // 32, 2 * 200 + 5 * 32)],
                         ids=["half-2-epochs", "all-half-epoch", "quarter-budget"])
def test_main_fraction_and_finetune_length(tiny_recipe_dict, tmp_path, main_fraction, finetune, ft_steps, ft_images):
    from lotus_deploy.pipeline import compress

    cfg = {"main_fraction": main_fraction, "finetune_steps": None, **finetune}
    run = compress(_recipe(tiny_recipe_dict, eval_rounds=False, **cfg), out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    main_images = round(main_fraction * 200)
    assert m["images_seen"]["main"] == m["n_rounds"] * main_images == 3 * main_images
    assert m["finetune_steps"] == ft_steps and m["images_seen"]["finetune"] == ft_images
    assert m["schedule"]["total_steps"] == 3 * math.ceil(main_images / 32) + ft_steps


def test_start_prunes_first_then_rounds(tiny_recipe_dict, tmp_path):
    from lotus_deploy.pipeline import compress

    run = compress(_recipe(tiny_recipe_dict, start=0.4, eval_rounds=False), out=tmp_path / "run", quiet=True)
    m = _soup_entry(run)["metrics"]
    assert m["input_sparsity"] == pytest.approx(0.2, abs=1e-3) and m["start_sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert m["rounds"][0]["start_sparsity"] == pytest.approx(0.4, abs=1e-3)
    assert m["n_rounds"] == 2 and abs(m["scope_sparsity"] - 0.6) <= 0.005  # 0.4 -> 0.52 -> 0.616, capped at 0.6


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
    import torch
    from safetensors import safe_open

    from lotus_deploy.pipeline import compress
    from lotus_deploy.run import Run

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
    with safe_open(str(ckpt), framework="pt") as f:  # the main model's optimizer is saved with the round
        assert f.metadata()["optim_step"] == "4" and any(k.startswith("optim/") for k in f.keys())

    monkeypatch.setattr(soup, "play_round", real)
    resumed = compress(recipe, out=tmp_path / "crashed", resume=True, quiet=True)
    m = _soup_entry(resumed)["metrics"]
    assert m["resumed_after_round"] == 1
    assert m["final_masks_hash"] == ref["final_masks_hash"]
    assert [r["combined_masks_hash"] for r in m["rounds"]] == [r["combined_masks_hash"] for r in ref["rounds"]]
    assert [r["main_top1"] for r in m["rounds"]] == [r["main_top1"] for r in ref["rounds"]]
    assert m["images_seen"] == ref["images_seen"] and m["top1"] == ref["top1"]
    a, b = Run(clean).load("final")[0].state_dict(), Run(resumed).load("final")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit
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
