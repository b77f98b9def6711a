"""2:4 masks: the pattern lies along K (in_features), keeps the largest |w|, respects earlier masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from lotus_deploy.prune.two_four import (
    eligible,
    is_small,
    is_two_four,
    kept_magnitude,
    two_four_groups,
    two_four_masks,
    two_four_violations,
)

SHAPES = [(8, 16), (32, 64), (24, 48), (3, 4)]


def rand(shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_masks_are_two_four_along_in_features(shape):
    w = rand(shape)
    m = two_four_masks(w)
    assert m.dtype == torch.bool and m.shape == w.shape
    groups = m.view(shape[0], shape[1] // 4, 4).sum(-1)  # (out, K/4)
    assert (groups == 2).all()  # no earlier mask: exactly 2 of every 4 survive
    assert is_two_four(w * m, axis=1)
    assert two_four_violations(w * m, axis=1) == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_masks_keep_the_largest_magnitudes_per_group(shape):
    w = rand(shape, seed=1)
    m = two_four_masks(w)
    a = w.abs().view(shape[0], -1, 4)
    km = m.view(shape[0], -1, 4)
    kept_min = torch.where(km, a, torch.full_like(a, float("inf"))).amin(-1)
    dropped_max = torch.where(~km, a, torch.full_like(a, -1.0)).amax(-1)
    assert (kept_min >= dropped_max).all()
    # Same as sorting each group by hand.
    expect = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.topk(2, dim=-1).indices, True)
    assert torch.equal(km, expect)


def test_ties_keep_the_lower_index():
    m = two_four_masks(torch.ones(2, 8))
    assert m.tolist() == [[True, True, False, False] * 2] * 2


@pytest.mark.parametrize("density", [0.2, 0.5, 0.8], ids=lambda d: f"existing_density{d}")
def test_combined_with_existing_mask_satisfies_both(density):
    w = rand((16, 32), seed=2)
    existing = torch.rand(16, 32, generator=torch.Generator().manual_seed(3)) < density
    m = two_four_masks(w, existing)
    assert not (m & ~existing).any()  # subset of the earlier mask
    assert is_two_four(m, 1)
    # The choice is made among survivors: min(2, survivors) kept, the largest surviving ones.
    survivors = existing.view(16, -1, 4)
    assert torch.equal(m.view(16, -1, 4).sum(-1), survivors.sum(-1).clamp(max=2))
    score = torch.where(existing, w.abs(), torch.full_like(w, -1.0)).view(16, -1, 4)
    kept = torch.where(m.view(16, -1, 4), score, torch.full_like(score, float("inf"))).amin(-1)
    dropped = torch.where(~m.view(16, -1, 4) & survivors, score, torch.full_like(score, -1.0)).amax(-1)
    assert (kept >= dropped).all()


def test_pure_and_rejects_bad_shapes():
    w = rand((8, 16))
    before = w.clone()
    two_four_masks(w)
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_masks(rand((8, 10)))
    with pytest.raises(ValueError, match="2-D"):
        two_four_masks(rand((2, 8, 16)))
    with pytest.raises(ValueError, match="shape"):
        two_four_masks(w, torch.ones(8, 8, dtype=torch.bool))


def test_compliance_depends_on_the_axis():
    m = two_four_masks(rand((8, 16)))
    w = rand((8, 16)) * m  # 2:4 along dim 1 (K), dense along dim 0
    assert is_two_four(w, 1) and is_two_four(w, -1)
    assert not is_two_four(w, 0)
    assert is_two_four(w.T, 0) and not is_two_four(w.T, 1)
    assert is_two_four(w.numpy(), 1) and not is_two_four(w.T.numpy(), 1)  # numpy arrays too


def test_violation_count_and_undefined_axis():
    w = torch.zeros(4, 8)
    w[0, :3] = 1.0  # 3 non-zeros in one group
    w[2, 4:] = 1.0  # 4 in another
    w[3, :2] = 1.0  # fine
    assert two_four_violations(w, 1) == 2
    assert two_four_groups(w, 1) == 8
    assert two_four_violations(torch.zeros(4, 6), 1) is None  # K % 4 != 0: never 2:4
    assert not is_two_four(torch.zeros(4, 6), 1)
    assert two_four_groups(torch.zeros(4, 6), 1) == 0


def test_conv_weight_groups_run_along_input_channels():
    w = torch.zeros(2, 8, 3, 3)  # (O, I, kh, kw)
    w[:, 0] = w[:, 1] = 1.0  # 2 of the first 4 input channels at every tap
    assert is_two_four(w, 1)
    w[0, 2, 1, 1] = 1.0  # a third one at one tap
    assert two_four_violations(w, 1) == 1


@pytest.mark.parametrize(
    "module,reason",
    [
        (nn.Linear(32, 64), None),
        (nn.Linear(64, 32, dtype=torch.float16), None),
        (nn.Linear(64, 32, dtype=torch.bfloat16), None),
        (nn.Linear(24, 64), "in_features 24 is not a multiple of 16"),
        (nn.Linear(32, 10), "out_features 10 is not a multiple of 8"),
        (nn.Linear(32, 64, dtype=torch.float64), "float64"),
        (nn.Conv2d(32, 64, 1), "not an nn.Linear (Conv2d)"),
        (nn.LayerNorm(32), "not an nn.Linear (LayerNorm)"),
    ],
    ids=["fp32", "fp16", "bf16", "in24", "out10", "fp64", "conv", "layernorm"],
)
def test_eligibility(module, reason):
    got = eligible(module)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_micro_vit_block_linears_are_eligible_and_small(micro_model):
    linears = {n: m for n, m in micro_model.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, m in linears.items() if eligible(m) is None} == {n for n in linears if n.startswith("blocks.")}
    assert "out_features 10" in eligible(linears["head"])
    assert all(is_small(m) for m in linears.values())  # width 32 << 256 channels
    assert not is_small(nn.Linear(256, 512))


def test_kept_magnitude():
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    assert kept_magnitude(w, two_four_masks(w)) == pytest.approx(0.7)
    assert kept_magnitude(w, torch.ones(1, 4, dtype=torch.bool)) == 1.0
    assert kept_magnitude(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool)) == 1.0
    assert 0.5 <= kept_magnitude(rand((32, 64)), two_four_masks(rand((32, 64)))) <= 1.0


def test_numpy_and_torch_agree():
    w = rand((8, 32), seed=5) * (torch.rand(8, 32, generator=torch.Generator().manual_seed(6)) < 0.5)
    assert two_four_violations(w, 1) == two_four_violations(np.asarray(w), 1)
