"""ISP as its authors run it, the parts: the plan (rounds, steps, images fixed in advance), the main
model's one optimizer and schedule (:mod:`lotus_deploy.schedule`), learners as independent jobs."""

from __future__ import annotations

import pytest
import torch

from lotus_deploy.masks import masks_hash
from lotus_deploy.prune import soup
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.schedule import Schedule, ScheduledTrainer
from lotus_deploy.train import lr_factor

# ----------------------------------------------------------------------------- the plan


def _cfg(**kw) -> InstantSoup:
    return InstantSoup(**{"sparsity": 0.6, "learners": 2, "data_fraction": 0.2, "step": 0.2, **kw})


def test_plan_fixes_rounds_steps_and_images():
    plan = soup.plan_soup(_cfg(), start=0.2, target=0.6, n_train=200, batch_size=32, learners=2, max_rounds=50)
    assert plan.starts == pytest.approx((0.2, 0.36, 0.488)) and plan.reaches_target  # 0.5904 is within 0.05 of 0.6
    assert (plan.learner_steps, plan.learner_images) == (2, 40)  # 20 % of 200 = 40 images, batches 32 + 8
    assert (plan.main_steps, plan.main_images) == (4, 100)  # main_fraction 0.5 (the default), not data_fraction
    assert (plan.finetune_steps, plan.finetune_images) == (7, 200)  # finetune_epochs 1 over all 200 images
    assert plan.main_total_steps == 3 * 4 + 7
    assert plan.images() == {"learners": 3 * 2 * 40, "main": 3 * 100, "finetune": 200, "total": 240 + 300 + 200}


@pytest.mark.parametrize("kw, rounds, main_steps, finetune_steps, reaches", [
    ({"finetune_steps": 5}, 3, 4, 5, True),
    ({"finetune_epochs": 0.5, "main_fraction": 1.0, "main_epochs": 2.0}, 3, 14, 4, True),
    ({"main_epochs": 0}, 3, 0, 7, True),
    ({"budget_images": 1000}, 3, 4, (1000 - 240 - 300) // 32, True),
    ({"budget_images": 100}, 3, 4, 0, True),  # the rounds alone use more: no fine-tune
    ({"max_rounds": 2}, 2, 4, 7, False),
    ({"combine": "union_levels"}, 1, 4, 7, False),  # ISSP: one round by design, the rest one-shot
], ids=["finetune-steps", "all-data-2-epochs", "no-main", "budget", "budget-spent", "max-rounds", "union-levels"])
def test_plan_lengths(kw, rounds, main_steps, finetune_steps, reaches):
    cfg = _cfg(**kw)
    combine = soup.COMBINES[cfg.combine]
    plan = soup.plan_soup(cfg, 0.2, 0.6, 200, 32, combine.learners or cfg.learners, combine.rounds or cfg.max_rounds)
    assert (plan.rounds, plan.main_steps, plan.finetune_steps) == (rounds, main_steps, finetune_steps)
    assert plan.main_total_steps == rounds * main_steps + finetune_steps
    assert plan.reaches_target == reaches


def test_plan_with_stop_within_zero_ends_its_last_round_at_the_target():
    plan = soup.plan_soup(_cfg(stop_within=0.0), start=0.2, target=0.6, n_train=200, batch_size=32, learners=2, max_rounds=50)
    assert plan.starts == pytest.approx((0.2, 0.36, 0.488, 0.5904)) and plan.reaches_target
    assert soup.round_target(plan.starts[-1], 0.2, 0.6) == 0.6  # the fourth round's goal is capped at the target


def test_plan_without_rounds_when_the_start_is_near_the_target():
    plan = soup.plan_soup(_cfg(), start=0.58, target=0.6, n_train=200, batch_size=32, learners=2, max_rounds=50)
    assert plan.rounds == 0 and plan.main_total_steps == plan.finetune_steps == 7


@pytest.mark.parametrize("steps, n, images", [(3, 200, 96), (7, 200, 200), (9, 200, 264), (0, 200, 0)])
def test_images_of_steps_counts_the_short_last_batch(steps, n, images):
    assert soup.images_of_steps(steps, 32, n) == images


# ----------------------------------------------------------------------------- one optimizer, one schedule


@pytest.mark.parametrize("total, warmup, steps", [(100, 0.1, 10), (100, 5, 5), (10, 0.0, 0), (4, 20, 4)],
                         ids=["fraction", "steps", "none", "capped"])
def test_schedule_is_lr_factor_at_the_global_step(total, warmup, steps):
    s = Schedule.of(total, warmup, "cosine")
    assert s.warmup == steps
    assert [s.factor(i) for i in range(total)] == [lr_factor(i, total, steps, "cosine") for i in range(total)]


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def _segment_loader(batches, start: int):
    """``make_loader`` yielding ``batches[start:]`` (one epoch): the segment sees the batches by global step."""
    return lambda epoch: iter(batches[start:])


def _trainer(model, total=12, warmup=4):
    return ScheduledTrainer(model, Schedule(total, warmup, "cosine"), lr=1e-2, backbone_lr=1e-3, weight_decay=0.05, grad_clip=1.0)


def test_segments_train_as_one_run_of_the_same_steps(micro_model):
    import copy

    batches = _batches(12)
    one, split = copy.deepcopy(micro_model), copy.deepcopy(micro_model)
    masks = prune_masks(micro_model, ["blocks.*"], 0.5, "global")
    _trainer(one).train(_segment_loader(batches, 0), 12, masks=masks)
    t = _trainer(split)
    seen = []
    for steps in (3, 4, 5):  # three rounds' segments
        history = t.train(_segment_loader(batches, t.step), steps, masks=masks)
        seen.append(history[-1]["step"])
        heads = [g["lr"] for g in t.optimizer.param_groups]
        assert max(heads) == pytest.approx(1e-2 * t.schedule.factor(t.step - 1))  # no restart of the schedule
    assert seen == [3, 7, 12] and t.step == 12
    first = t.optimizer.param_groups[0]["params"][0]
    assert float(t.optimizer.state[first]["step"]) == 12  # one Adam state across the segments
    a, b = one.state_dict(), split.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="past the schedule"):
        t.train(_segment_loader(batches, 0), 1)


def test_saved_optimizer_continues_bit_for_bit(micro_model, tmp_path):
    import copy

    batches = _batches(8)
    masks = prune_masks(micro_model, ["blocks.*"], 0.3, "global")
    live = _trainer(copy.deepcopy(micro_model), total=8, warmup=2)
    live.train(_segment_loader(batches, 0), 5, masks=masks)
    path = tmp_path / soup.ROUND_FILE
    soup.save_round(path, live.model, masks, [{"round": 1}], {"main": 20}, "fp", *live.state_tensors())

    saved = soup.load_round(path, "fp")
    assert soup.load_round(path, "another") is None
    fresh = copy.deepcopy(micro_model)
    resumed = _trainer(fresh, total=8, warmup=2)  # built first, as the stage does: the optimizer holds these parameters
    fresh.load_state_dict(saved.model)
    resumed.load_state_tensors(saved.extra_tensors, saved.meta)
    assert resumed.step == 5 and saved.rounds == [{"round": 1}] and saved.images == {"main": 20}
    for t in (live, resumed):
        t.train(_segment_loader(batches, 5), 3, masks=masks)
    a, b = live.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="schedule"):  # another plan's schedule is refused
        _trainer(copy.deepcopy(micro_model), total=9, warmup=2).load_state_tensors(saved.extra_tensors, saved.meta)


# ----------------------------------------------------------------------------- learners as jobs


@pytest.fixture
def digits(micro_model):
    from lotus_deploy.data import build_data
    from lotus_deploy.models import input_spec
    from lotus_deploy.recipe.base import DataConfig

    return build_data(DataConfig(kind="digits", train_subset=100, eval_subset=50, augment="none"), input_spec(micro_model))


def _jobs(model, masks, data, n=2):
    cfg = _cfg(lr=1e-2, backbone_lr=1e-2, weight_decay=0.0, label_smoothing=0.0, grad_clip=1.0)
    spec = soup.learner_spec(cfg, steps=3)
    return [soup.LearnerJob(round=1, learner=j, seed=100 + j, fraction=0.3, spec=spec, goals=[0.4],
                            combine=soup.COMBINES["union"], scope=["blocks.*"], model=model, masks=masks, data=data,
                            batch_size=16, device=torch.device("cpu")) for j in range(n)]


def test_learner_spec_warms_up_from_zero_over_all_its_steps():
    spec = soup.learner_spec(_cfg(lr=1e-3, backbone_lr=1e-4, weight_decay=0.0, label_smoothing=0.0, grad_clip=1.0), steps=4)
    assert spec.steps == 4 and spec.schedule == "constant" and spec.grad_clip == 1.0
    assert [lr_factor(i, 4, int(spec.warmup), spec.schedule) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_learner_jobs_depend_on_themselves_alone(micro_model, digits):
    masks = prune_masks(micro_model, ["blocks.*"], 0.2, "global")
    before = masks_hash({k: p.detach().clone() for k, p in micro_model.named_parameters()})
    jobs = _jobs(micro_model, masks, digits)
    forward = [soup.train_learner(j) for j in jobs]
    backward = [soup.train_learner(j) for j in reversed(jobs)][::-1]  # another order, as other ranks would
    assert [masks_hash(r.masks[0]) for r in forward] == [masks_hash(r.masks[0]) for r in backward]
    assert masks_hash(forward[0].masks[0]) != masks_hash(forward[1].masks[0])  # own seeds, own data
    assert masks_hash({k: p.detach() for k, p in micro_model.named_parameters()}) == before  # the main model is untouched
    for r in forward:
        assert r.images == soup.images_of_steps(3, 16, 30) == 30 + 16 and r.violations == 0 and r.seconds > 0 and r.top1 == []
        kept = torch.cat([m.flatten() for m in r.masks[0].values()])
        assert 1 - kept.float().mean().item() == pytest.approx(0.4, abs=1e-3)
        assert all(not bool(r.masks[0][k][~m].any()) for k, m in masks.items())  # what was removed stays removed
