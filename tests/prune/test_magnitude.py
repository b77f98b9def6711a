"""One-shot magnitude masks of a model's scope (prune_masks) and the rank-once sweep masks (ranked_masks)."""

from __future__ import annotations

import pytest
import torch

from lotus_deploy.masks import apply_masks_, magnitude_masks, masks_hash
from lotus_deploy.prune.magnitude import prune_masks, ranked_masks
from lotus_deploy.scope import DEFAULT_SCOPE


def zeros(m: torch.Tensor) -> int:
    return int((~m).sum())


def test_prune_masks_empty_scope_raises(micro_model):
    with pytest.raises(ValueError, match="selects no prunable weights"):
        prune_masks(micro_model, ["nothing.here"], 0.5, "global")


def test_prune_masks_existing_is_filtered_to_scope(micro_model):
    first = prune_masks(micro_model, ["blocks.0.*"], 0.5, "per_layer")
    extra = {"head.weight": torch.zeros_like(micro_model.head.weight, dtype=torch.bool)}
    second = prune_masks(micro_model, DEFAULT_SCOPE, 0.75, "per_layer", existing={**first, **extra})
    assert "head.weight" not in second
    for k in first:
        assert not (second[k] & ~first[k]).any()


def test_iterative_pruning_reaches_the_new_target(micro_model):
    first = prune_masks(micro_model, DEFAULT_SCOPE, 0.5, "global")
    apply_masks_(micro_model, first)
    second = prune_masks(micro_model, DEFAULT_SCOPE, 0.8, "global", existing=first)
    n = sum(m.numel() for m in second.values())
    assert sum(zeros(m) for m in second.values()) == round(0.8 * n)
    for k in first:
        assert not (second[k] & ~first[k]).any()


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
@pytest.mark.parametrize("with_existing", [False, True], ids=["fresh", "existing"])
def test_ranked_masks_equal_magnitude_masks(granularity, with_existing):
    g = torch.Generator().manual_seed(1)
    w = {"a": torch.randint(-4, 5, (30, 20), generator=g).float(), "b": torch.randn(300, generator=g)}  # ties in a
    existing = magnitude_masks({k: torch.rand(v.shape, generator=g) for k, v in w.items()}, 0.3) if with_existing else None
    at = ranked_masks(w, granularity, existing)
    for s in [0.0, 0.1, 0.25, 0.5, 0.9, 0.5]:
        assert masks_hash(at(s)) == masks_hash(magnitude_masks(w, s, granularity, existing))
