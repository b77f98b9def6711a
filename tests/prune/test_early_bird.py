"""Early-bird detection: distances and drawing on synthetic masks."""

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
