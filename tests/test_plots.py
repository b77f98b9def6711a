"""Plots are written as real, non-trivial PNGs (looked at by people, so at least checked to exist and parse)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lotus_deploy import plots


def png(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 150
        assert len(set(im.convert("L").tobytes())) > 10  # not a blank canvas
    return path


@pytest.mark.parametrize("plot", ["sweep", "early_bird", "soup_rounds", "tickets", "curves"])
def test_plot_writes_a_png(tmp_path, plot):
    p = tmp_path / f"{plot}.png"
    if plot == "sweep":
        plots.plot_sweep(p, {"scope": [(0.0, 90.0), (0.2, 89.5), (0.4, 80.0)]}, 90.0,
                         knees={"scope": {"knee": 0.2, "knee_curvature": 0.4}}, tolerance=1.0)
    elif plot == "early_bird":
        plots.plot_early_bird(p, [1, 2, 3, 4], [None, 0.3, 0.1, 0.01], 0.05, drawn_x=4)
    elif plot == "soup_rounds":
        plots.plot_soup_rounds(p, [{"round": 1, "start_sparsity": 0.0, "sparsity": 0.1, "combined_top1": 80.0, "main_top1": 82.0, "learner_top1": [70.0, 71.0]},
                                   {"round": 2, "sparsity": 0.2, "combined_top1": 78.0, "main_top1": 80.0, "learner_top1": [69.0, 72.0]}], 0.5)
    elif plot == "tickets":
        imgs = torch.rand(4, 3, 32, 32)
        plots.plot_tickets(p, imgs, imgs * 0.5, labels=["a", "b", "c", "d"], cols=2)
    else:
        plots.plot_training_curves(p, [{"epoch": 1, "train_loss": 1.0, "eval_top1": 50.0}, {"epoch": 2, "train_loss": 0.5, "eval_top1": 70.0}])
    png(p)
