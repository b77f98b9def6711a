"""The one top-1 loop: top-1/top-5/loss against hand counts, several predictors, torch and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lotus_deploy.metrics import TopK, agreement, top1_loop


def batches():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    return [(logits[:2], labels[:2]), (logits[2:], labels[2:])], logits, labels


@pytest.mark.parametrize("as_numpy", [False, True], ids=["torch", "numpy"])
def test_top1_top5_loss_match_hand_counts(as_numpy):
    bs, logits, labels = batches()
    fn = (lambda x: x.numpy()) if as_numpy else (lambda x: x)
    r = top1_loop({"m": fn}, bs, keep_logits=True)["m"]
    assert r["top1"] == pytest.approx(50.0)  # rows 0 and 2 right
    assert r["top5"] == pytest.approx(100.0)  # 3 classes: top-5 holds every label
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert r["loss"] == pytest.approx(expected, rel=1e-6)
    assert r["images"] == 4 and r["logits"].shape == (4, 3)


def test_several_predictors_and_agreement():
    bs, logits, _ = batches()
    r = top1_loop({"a": lambda x: x, "b": lambda x: -x}, bs, keep_logits=True)
    assert r["a"]["top1"] == 50.0 and r["b"]["images"] == 4
    ag = agreement(r["a"]["logits"], r["b"]["logits"])
    assert ag["top1_agreement"] == 0.0 and ag["max_abs_diff"] == pytest.approx(10.0)


def test_tuple_inputs_reach_the_predictor():
    x = torch.eye(3)
    r = top1_loop({"m": lambda inp: inp[0] * inp[1]}, [((x, 2.0), torch.tensor([0, 1, 2]))])["m"]
    assert r["top1"] == 100.0


def test_empty_loop():
    r = TopK().result()
    assert r["images"] == 0 and math.isnan(r["loss"])
    assert math.isnan(agreement(np.zeros((0, 3)), np.zeros((0, 3)))["top1_agreement"])
