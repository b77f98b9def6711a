"""Training loop: masks stay exactly zero under AdamW with weight decay, head-only, schedule, eval."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.scope import DEFAULT_SCOPE
from lotus_deploy.train import TrainSpec, evaluate, lr_factor, param_groups, train

CPU = torch.device("cpu")


def synthetic_loader(n_batches: int = 3, batch: int = 8, seed: int = 0, extra: bool = False):
    """epoch -> list of (x, y[, extra]) batches of 32 px images, 10 classes."""

    def make(epoch: int):
        g = torch.Generator().manual_seed(seed + epoch)
        out = []
        for _ in range(n_batches):
            x = torch.randn(batch, 3, 32, 32, generator=g)  # (B, 3, 32, 32)
            y = torch.randint(0, 10, (batch,), generator=g)
            out.append((x, y, torch.ones(batch)) if extra else (x, y))
        return out

    return make


def test_masked_weights_stay_exactly_zero(micro_model):
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.5, "global")
    apply_masks_(micro_model, masks)
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    spec = TrainSpec(train="all", steps=5, lr=5e-2, weight_decay=0.5, warmup=0, schedule="constant")
    hist = train(micro_model, spec, synthetic_loader(), 3, CPU, masks=masks, log=lambda m: None)
    assert hist[-1]["step"] == 5
    params = dict(micro_model.named_parameters())
    for k, m in masks.items():
        assert (params[k][~m] == 0).all(), k  # exactly zero, not merely small
        assert not torch.equal(params[k][m], before[k][m]), f"{k} did not train"


def test_without_masks_the_same_zeros_do_not_survive(micro_model):
    """The control for the test above: AdamW revives zeroed weights unless masks are enforced."""
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.5, "global")
    apply_masks_(micro_model, masks)
    spec = TrainSpec(train="all", steps=2, lr=5e-2, weight_decay=0.5, warmup=0, schedule="constant")
    train(micro_model, spec, synthetic_loader(), 3, CPU, masks=None, log=lambda m: None)
    params = dict(micro_model.named_parameters())
    revived = sum(int((params[k][~m] != 0).sum()) for k, m in masks.items())
    assert revived > 0


def test_masks_are_applied_before_the_first_step(micro_model):
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.3, "per_layer")  # not applied yet
    seen = []

    def forward(x, extra):
        w = micro_model.blocks[0].attn.qkv.weight
        seen.append(bool((w[~masks["blocks.0.attn.qkv.weight"]] == 0).all()))
        return micro_model(x)

    spec = TrainSpec(steps=2, lr=1e-3, warmup=0)
    train(micro_model, spec, synthetic_loader(), 3, CPU, masks=masks, forward=forward, log=lambda m: None)
    assert seen == [True, True]


def test_head_only_trains_only_the_head(micro_model):
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    spec = TrainSpec(train="head", steps=3, lr=1e-2, warmup=0)
    train(micro_model, spec, synthetic_loader(), 3, CPU, log=lambda m: None)
    after = micro_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}


def test_param_groups_decay_rules(micro_model):
    groups = param_groups(micro_model, "all", lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    names = {id(p): n for n, p in micro_model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            seen.add(n)
            no_decay = p.ndim <= 1 or n in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
            assert g["lr"] == (1e-3 if n.startswith("head.") else 1e-4), n
    assert seen == set(names.values())


def test_lr_schedule():
    total, warmup = 10, 2
    f = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)  # linear warm-up
    assert f[2] == pytest.approx(1.0)  # cosine starts at the peak
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # then only decreases
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert [lr_factor(s, total, 0, "constant") for s in range(total)] == [1.0] * total


@pytest.mark.parametrize(
    "spec,steps_per_epoch,expected_epochs,expected_steps",
    [
        (TrainSpec(steps=5), 3, 2, 5),
        (TrainSpec(epochs=2), 3, 2, 6),
        (TrainSpec(epochs=0.5), 4, 1, 2),
        (TrainSpec(epochs=1, steps=1), 3, 1, 1),
    ],
    ids=["steps-cross-epochs", "epochs", "fractional-epoch", "steps-override-epochs"],
)
def test_length_in_steps_or_epochs(micro_model, spec, steps_per_epoch, expected_epochs, expected_steps):
    spec.warmup = 0
    hist = train(micro_model, spec, synthetic_loader(steps_per_epoch), steps_per_epoch, CPU, log=lambda m: None)
    assert len(hist) == expected_epochs
    assert hist[-1]["step"] == expected_steps


def test_history_has_eval_each_epoch_and_early_stop(micro_model):
    calls = []

    def evaluate_fn():
        calls.append(1)
        return {"top1": 12.5}

    spec = TrainSpec(epochs=3, warmup=0)
    hist = train(
        micro_model, spec, synthetic_loader(2), 2, CPU, evaluate_fn=evaluate_fn,
        on_epoch=lambda epoch, rec: epoch == 2, log=lambda m: None,
    )
    assert len(hist) == 2 and len(calls) == 2
    assert hist[-1]["eval_top1"] == 12.5
    for key in ("epoch", "step", "train_loss", "train_acc", "lr", "seconds"):
        assert key in hist[0]
    stopped = train(micro_model, TrainSpec(epochs=3, warmup=0), synthetic_loader(2), 2, CPU, on_step=lambda s: s == 3, log=lambda m: None)
    assert stopped[-1]["step"] == 3


def test_batches_with_extra_reach_the_forward(micro_model):
    extras = []

    def forward(x, extra):
        extras.append(extra)
        return micro_model(x)

    train(micro_model, TrainSpec(steps=2, warmup=0), synthetic_loader(extra=True), 3, CPU, forward=forward, log=lambda m: None)
    assert len(extras) == 2 and all(e is not None and e.shape == (8,) for e in extras)


class _Fixed(nn.Module):
    """Predicts class ``i % 3`` for the i-th image of the batch (as logits over 4 classes)."""

    def forward(self, x):  # (B, ...) -> (B, 4)
        b = x.shape[0]
        logits = torch.zeros(b, 4)
        logits[torch.arange(b), torch.arange(b) % 3] = 10.0
        logits[torch.arange(b), 3] = 5.0  # second choice
        return logits


def test_evaluate_counts_top1_and_top5():
    x = torch.zeros(6, 1)
    y = torch.tensor([0, 1, 2, 3, 3, 0])  # predictions 0 1 2 0 1 2 -> 3 of 6 right; 3 is second choice
    m = evaluate(_Fixed(), [(x, y)], CPU)
    assert m["top1"] == pytest.approx(50.0)
    assert m["top5"] == pytest.approx(100.0)  # only 4 classes: top-k is capped
    assert m["images"] == 6 and m["loss"] > 0


def test_evaluate_restores_training_mode(micro_model):
    micro_model.train()
    evaluate(micro_model, synthetic_loader(1)(0), CPU)
    assert micro_model.training
