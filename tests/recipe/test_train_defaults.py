"""The recipe's ``train:`` section: inheritance, overrides, dump, fingerprints, safe defaults, bad values."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import ROOT

from lotus_deploy.recipe import (
    RecipeError,
    dump_recipe,
    load_recipe,
    parse_recipe,
    stage_fingerprint,
)
from lotus_deploy.recipe.base import TRAIN_FIELDS


def _new_user(tiny_recipe_dict) -> dict:
    """A chain as a new user writes it: no ``train:`` section, no learning rates anywhere."""
    raw = copy.deepcopy(tiny_recipe_dict)
    del raw["train"]
    raw["stages"] = [
        {"kind": "finetune", "name": "fit", "epochs": 1},
        {"kind": "instant_soup", "sparsity": 0.5},
        {"kind": "lottery_finetune", "name": "lottery"},
    ]
    return raw


def test_new_user_chain_resolves_to_a_safe_backbone_lr(tiny_recipe_dict):
    import torch

    from lotus_deploy.prune.soup import learner_spec
    from lotus_deploy.train import param_groups

    r = parse_recipe(_new_user(tiny_recipe_dict))
    for s in r.stages:
        assert s.lr == 1e-3 and s.backbone_lr == pytest.approx(1e-3 / 30), s.name
        assert s.weight_decay == 0.05 and s.grad_clip == 1.0 and s.label_smoothing == 0.1 and s.batch_size == 32
    ft, isp, lottery = r.stages
    assert ft.warmup == lottery.warmup == isp.warmup == 0.1 and ft.schedule == isp.schedule == "cosine"
    # what the soup's learners really train with (the main model's trainer takes isp.lr / isp.backbone_lr as they are)
    spec = learner_spec(isp, steps=8)
    assert spec.backbone_lr == pytest.approx(1e-3 / 30) and spec.grad_clip == 1.0
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model.get_classifier = lambda: model[1]
    lrs = sorted({g["lr"] for g in param_groups(model, "all", spec.lr, spec.backbone_lr, spec.weight_decay)})
    assert lrs == [pytest.approx(1e-3 / 30), 1e-3]  # backbone 3.3e-5, head 1e-3


def test_unset_fields_inherit_and_set_fields_win(tiny_recipe_dict):
    raw = _new_user(tiny_recipe_dict)
    raw["train"] = {"lr": 4e-4, "weight_decay": 0.1, "warmup": 0.2, "schedule": "constant", "grad_clip": 2.0,
                    "label_smoothing": 0.05, "batch_size": 16}
    raw["stages"][0].update(lr=1e-3, grad_clip=0, batch_size=8)
    raw["stages"][1].update(backbone_lr=1e-6, warmup=0)
    ft, isp, lottery = parse_recipe(raw).stages
    assert (ft.lr, ft.backbone_lr, ft.grad_clip, ft.batch_size) == (1e-3, pytest.approx(1e-3 / 30), 0, 8)  # backbone follows its own lr
    assert (ft.weight_decay, ft.warmup, ft.schedule, ft.label_smoothing) == (0.1, 0.2, "constant", 0.05)
    assert (isp.lr, isp.backbone_lr, isp.warmup, isp.schedule, isp.grad_clip, isp.batch_size) == (4e-4, 1e-6, 0, "constant", 2.0, 16)
    assert (lottery.lr, lottery.backbone_lr, lottery.batch_size) == (4e-4, pytest.approx(4e-4 / 30), 16)


def test_train_backbone_lr_and_scale(tiny_recipe_dict):
    raw = _new_user(tiny_recipe_dict)
    raw["train"] = {"backbone_lr": 2e-5}
    assert {s.backbone_lr for s in parse_recipe(copy.deepcopy(raw)).stages} == {2e-5}
    raw["train"] = {"backbone_lr_scale": 1.0}  # trained from scratch: one lr everywhere
    assert all(s.backbone_lr == s.lr for s in parse_recipe(raw).stages)


def test_stage_fields_not_in_train_keep_their_own_defaults(tiny_recipe_dict):
    isp = parse_recipe(_new_user(tiny_recipe_dict)).stages[1]
    assert set(isp.train_fields) == set(TRAIN_FIELDS)  # warmup / schedule: the main model's one schedule
    assert (isp.main_fraction, isp.finetune_epochs, isp.learners, isp.start) == (0.5, 1.0, 5, "input")  # the soup's own


def test_dump_shows_the_resolved_values_and_round_trips(tiny_recipe_dict):
    r = parse_recipe(_new_user(tiny_recipe_dict))
    d = yaml.safe_load(dump_recipe(r))
    assert d["train"]["lr"] == 1e-3 and d["train"]["backbone_lr"] is None
    assert d["stages"][1]["lr"] == 1e-3 and d["stages"][1]["backbone_lr"] == pytest.approx(1e-3 / 30)
    assert d["stages"][0]["grad_clip"] == 1.0 and d["stages"][2]["label_smoothing"] == 0.1
    again = parse_recipe(d)
    assert again == r and dump_recipe(again) == dump_recipe(r)


def test_fingerprint_follows_the_inherited_settings(tiny_recipe_dict):
    del tiny_recipe_dict["stages"][2]["lr"]  # recover inherits train.lr; train sets its own
    fp = lambda r: [stage_fingerprint(r, i) for i in range(len(r.stages))]  # noqa: E731
    base = fp(parse_recipe(copy.deepcopy(tiny_recipe_dict)))
    for override in ("train.lr=1e-4", "train.grad_clip=0.5", "train.label_smoothing=0.2", "train.batch_size=16"):
        other = fp(parse_recipe(copy.deepcopy(tiny_recipe_dict), overrides=[override]))
        same = [a == b for a, b in zip(base, other)]
        if override == "train.lr=1e-4":
            assert same == [True, True, False, False], override  # only the stage that inherits lr (and after)
        else:
            assert same == [False, False, False, False], override  # both training stages inherit it
    # a train value no stage inherits invalidates nothing
    tiny_recipe_dict["stages"][2]["lr"] = 5e-4
    assert fp(parse_recipe(copy.deepcopy(tiny_recipe_dict), overrides=["train.lr=1e-4"])) == fp(parse_recipe(tiny_recipe_dict))


def test_shipped_recipes_keep_their_previous_training():
    """demo.yaml (lr 1e-3 since benchmarks/results/demo_seeds.md) and cifar10_prune30.yaml (the former cifar10.yaml) train exactly as before the ``train:`` section existed."""
    demo = {s.name: s for s in load_recipe(ROOT / "recipes" / "demo.yaml").stages}
    for name, lr, ls, warmup in (("train", 1e-3, 0.1, 0.05), ("recover", 5e-4, 0.0, 0.1)):
        s = demo[name]
        assert (s.lr, s.backbone_lr, s.label_smoothing, s.warmup) == (lr, lr, ls, warmup), name
        assert (s.weight_decay, s.schedule, s.grad_clip, s.batch_size) == (0.05, "cosine", 0, 32), name
    cifar = load_recipe(ROOT / "recipes" / "cifar10_prune30.yaml", ["data.root=/nonexistent"]).stages
    assert [(s.lr, s.backbone_lr, s.grad_clip, s.label_smoothing) for s in cifar if s.kind == "finetune"] == [
        (1e-3, 3e-5, 0, 0.1), (3e-4, 1e-5, 0, 0.1)]


@pytest.mark.parametrize(
    "section,value,loc,msg",
    [
        ("train", {"lr": 0}, "train.lr", "greater than 0"),
        ("train", {"lr": float("nan")}, "train.lr", "finite number"),
        ("train", {"backbone_lr_scale": 2}, "train.backbone_lr_scale", "less than or equal to 1"),
        ("train", {"grad_clip": -1}, "train.grad_clip", "greater than or equal to 0"),
        ("train", {"label_smoothing": 1}, "train.label_smoothing", "less than 1"),
        ("train", {"schedule": "linear"}, "train.schedule", "'cosine' or 'constant'"),
        ("train", {"batch_size": 0}, "train.batch_size", "greater than 0"),
        ("train", {"momentum": 0.9}, "train.momentum", "unknown field; allowed: lr, backbone_lr"),
        ("train", [1e-3], "train", "valid dictionary"),
        ("stage", {"grad_clip": -0.5}, "stages.2.grad_clip", "greater than or equal to 0"),
        ("stage", {"lr": float("inf")}, "stages.2.lr", "finite number"),
        ("stage", {"distill": {"alpha": 1.5}}, "stages.2.distill.alpha", "less than or equal to 1"),
        ("stage", {"distill": {"temperature": 0}}, "stages.2.distill.temperature", "greater than 0"),
        ("stage", {"distill": {"teacher": "final"}}, "stages.2.distill.teacher", "not a variant finished before this stage"),
        ("stage", {"distill": {"teacher": "recover"}}, "stages.2.distill.teacher", "not a variant finished before this stage"),
        ("stage", {"distill": {"hardness": 0.5}}, "stages.2.distill.hardness", "unknown field; allowed: teacher, alpha, temperature"),
        ("first", {"distill": {}}, "stages.0.distill.teacher", "dense (the model before the first pruning stage) is not finished"),
        ("soup", {"distill": {}}, "stages.1.distill", "unknown field"),
    ],
)
def test_bad_values_are_recipe_errors(tiny_recipe_dict, section, value, loc, msg):
    if section == "train":
        tiny_recipe_dict["train"] = value
    elif section == "soup":
        tiny_recipe_dict["stages"][1] = {"kind": "instant_soup", "sparsity": 0.5, **value}
    else:
        tiny_recipe_dict["stages"][0 if section == "first" else 2].update(value)
    with pytest.raises(RecipeError) as ei:
        parse_recipe(tiny_recipe_dict, "r.yaml")
    probs = ei.value.problems
    assert len(probs) == 1 and probs[0].loc == loc and msg in probs[0].msg, [p.format("r.yaml") for p in probs]


@pytest.mark.parametrize("teacher", ["dense", "initial", "train", "magnitude_prune"])
def test_finished_teachers_are_accepted(tiny_recipe_dict, teacher):
    tiny_recipe_dict["stages"][2]["distill"] = {"teacher": teacher}
    d = parse_recipe(tiny_recipe_dict).stages[2].distill
    assert (d.teacher, d.alpha, d.temperature) == (teacher, 0.5, 2.0)
