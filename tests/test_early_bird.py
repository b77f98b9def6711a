"""Early-bird detection: distances and drawing on synthetic masks, and the finetune option."""

from __future__ import annotations

import json

import pytest
import torch

from lotus_deploy.masks import masks_hash
from lotus_deploy.prune.early_bird import EarlyBirdDetector

N = 1000


def _flipped(n: int) -> dict:
    """A mask set that differs from the all-True mask in its first ``n`` of ``N`` positions."""
    a = torch.ones(600, dtype=torch.bool)
    b = torch.ones(20, 20, dtype=torch.bool)
    flat = torch.cat([a, b.flatten()])
    flat[:n] = False
    return {"a": flat[:600].clone(), "b": flat[600:].view(20, 20).clone()}


def _run(flips, window, threshold):
    det = EarlyBirdDetector(window=window, threshold=threshold)
    drawn = [det.update(_flipped(n), step=10 * (i + 1)) for i, n in enumerate(flips)]
    return det, drawn


def test_distances_are_normalized_hamming_to_each_earlier_mask():
    flips = [500, 300, 200, 150]
    det, _ = _run(flips, window=3, threshold=0.01)
    assert det.checks[0]["distances"] == [] and det.checks[0]["max_distance"] is None
    assert det.checks[1]["distances"] == [pytest.approx(0.2)]
    assert det.checks[2]["distances"] == [pytest.approx(0.3), pytest.approx(0.1)]  # oldest first
    assert det.checks[3]["distances"] == [pytest.approx(0.15), pytest.approx(0.05)]  # window of 3: 500 dropped
    assert det.checks[3]["max_distance"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    "flips, window, threshold, drawn_at",
    [
        ([500, 300, 200, 120, 100, 90, 85, 80], 3, 0.1, 6),  # check 5 window (200,120,100): 0.1 is not below 0.1
        ([500, 300, 200, 150, 140, 135, 130], 3, 0.1, 5),  # check 5 window (200,150,140): 0.06
        ([400, 400, 400, 400, 400], 5, 0.1, 5),  # identical masks: drawn as soon as the window is full
        ([400, 400, 400, 400], 5, 0.1, None),  # window never full
        ([800, 600, 400, 200, 0], 2, 0.1, None),  # steady 0.2 changes never settle
        ([300, 200, 100, 0], 2, 0.1, None),  # exactly 0.1 is not below 0.1
    ],
    ids=["settling", "settling-2", "identical", "window-not-full", "steady-drift", "at-threshold"],
)
def test_drawing(flips, window, threshold, drawn_at):
    det, drawn = _run(flips, window, threshold)
    expected = None
    for i in range(window - 1, len(flips)):  # brute force over full windows
        w = flips[i - window + 1 : i + 1]
        if max(abs(w[-1] - x) for x in w[:-1]) / N < threshold:
            expected = i + 1
            break
    assert expected == drawn_at
    assert (det.drawn["check"] if det.drawn else None) == drawn_at
    assert sum(drawn) == (drawn_at is not None)  # True exactly once, at the drawing check
    if drawn_at is not None:
        assert drawn[drawn_at - 1]
        assert det.drawn["step"] == 10 * drawn_at
        assert masks_hash(det.ticket) == masks_hash(_flipped(flips[drawn_at - 1]))
    else:
        assert det.ticket is None


def test_ticket_is_kept_after_later_checks():
    det, _ = _run([400] * 3 + [0, 900], window=3, threshold=0.1)
    assert det.drawn["check"] == 3 and masks_hash(det.ticket) == masks_hash(_flipped(400))
    s = det.summary()
    assert len(s["checks"]) == 5 and s["ticket_masks_hash"] == masks_hash(_flipped(400))
    json.dumps(s)  # manifest-ready


@pytest.mark.parametrize("window, threshold", [(1, 0.1), (5, 0.0), (5, 1.5)], ids=["window-1", "zero", "above-1"])
def test_bad_settings(window, threshold):
    with pytest.raises(ValueError):
        EarlyBirdDetector(window, threshold)


# ----------------------------------------------------------------------------- the finetune option


def _run_finetune(tiny_recipe_dict, tmp_path, early_bird, **ft):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    tiny_recipe_dict["stages"] = [{"kind": "finetune", "name": "train", "lr": 2e-3, "early_bird": early_bird, **ft}]
    run = compress(parse_recipe(tiny_recipe_dict), out=tmp_path / "run", quiet=True)
    entry = json.loads((run / "manifest.json").read_text())["stages"][0]
    return run, entry


def test_finetune_stops_at_ticket_and_saves_it(tiny_recipe_dict, tmp_path):
    from lotus_deploy.files import load_tensors
    from lotus_deploy.run import Run
    from lotus_deploy.stages.prune import prune_masks

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
