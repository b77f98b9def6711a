"""2:4 masks of a model's scope: eligible layers made 2:4, others skipped with the reason, earlier masks kept."""

from __future__ import annotations

import pytest
import torch.nn as nn

from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.semi_structured import kept_fraction, semi_structured_masks
from lotus_deploy.prune.two_four import is_two_four

BLOCK_LINEARS = {f"blocks.{b}.{l}.weight" for b in (0, 1) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


class Odd(nn.Module):
    """Block Linears of which only the first can use sparse kernels."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 20), nn.Linear(20, 32), nn.Conv2d(16, 16, 1)])


def test_default_scope_makes_every_block_linear_two_four(micro_model):
    masks, skipped = semi_structured_masks(micro_model, ["blocks.*"])
    assert set(masks) == BLOCK_LINEARS and skipped == {}
    params = dict(micro_model.named_parameters())
    for n, m in masks.items():
        assert is_two_four(params[n] * m, 1)
        assert m.float().mean() == 0.5


def test_ineligible_layers_are_skipped_with_the_reason():
    masks, skipped = semi_structured_masks(Odd(), ["blocks.*"])
    assert set(masks) == {"blocks.0.weight"}
    assert skipped == {
        "blocks.1.weight": "out_features 20 is not a multiple of 8",
        "blocks.2.weight": "in_features 20 is not a multiple of 16",
        "blocks.3.weight": "not an nn.Linear (Conv2d)",
    }


def test_scope_beyond_blocks_reports_head_and_non_weights(micro_model):
    masks, skipped = semi_structured_masks(micro_model, ["blocks.*", "head", "cls_token", "patch_embed.proj"])
    assert set(masks) == BLOCK_LINEARS
    assert skipped["head.weight"] == "out_features 10 is not a multiple of 8"
    assert skipped["patch_embed.proj.weight"] == "not an nn.Linear (Conv2d)"
    assert "not a layer weight" in skipped["cls_token"]
    with pytest.raises(ValueError, match="selects no"):
        semi_structured_masks(micro_model, ["nothing.here"])


@pytest.mark.parametrize("sparsity", [0.3, 0.7], ids=["unstructured30", "unstructured70"])
def test_combines_with_an_earlier_unstructured_mask(micro_model, sparsity):
    existing = prune_masks(micro_model, ["blocks.*"], sparsity, "global")
    masks, _ = semi_structured_masks(micro_model, ["blocks.*"], existing)
    for n, m in masks.items():
        assert not (m & ~existing[n]).any()  # everything pruned before stays pruned
        assert is_two_four(m, 1)
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros / total >= max(0.5, sparsity)



def test_kept_fraction(micro_model):
    masks, _ = semi_structured_masks(micro_model, ["blocks.*"])
    assert 0.5 < kept_fraction(micro_model, masks) < 1.0  # 2:4 keeps the larger half of each group
    assert kept_fraction(micro_model, {}) == 1.0
