"""Pruning criteria (magnitude, wanda, sparsegpt): exact sparsity and 2:4, masks in force, calibration, error."""

from __future__ import annotations

import typing

import pytest
import torch

from lotus_deploy.masks import apply_masks_, masks_hash, spread
from lotus_deploy.prune.calibration import calibrate, reconstruction_error
from lotus_deploy.prune.criteria import (
    CRITERIA,
    Magnitude,
    apply_pruned_,
    prune_model,
    statistic_for,
)
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.sparsegpt import sparsegpt_prune
from lotus_deploy.prune.sweep import sweep
from lotus_deploy.prune.two_four import is_two_four, two_four_masks
from lotus_deploy.scope import select_weights

SCOPE = ["blocks.*"]
COMBOS = [(c, g) for c in CRITERIA for g in CRITERIA[c].granularities]


def images(n=24, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (N, C, H, W)


@pytest.fixture
def calibrated(micro_model):
    """(model, weights in scope, Calibration with XᵀX) on random images.

    The LayerNorms get trained-looking affine parameters: at init (γ = 1, β = 0) the inputs of
    qkv and fc1 sum to zero over channels, XᵀX is singular along the all-ones direction, and on
    32 channels SparseGPT's compensation at 1 % damping can lose to magnitude (a trained
    LayerNorm lifts that degeneracy).
    """
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mod in micro_model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    names = list(select_weights(micro_model, SCOPE))
    return micro_model, names, calibrate(micro_model, names, images().split(8), "gram")


def test_registry_matches_recipe_and_refuses_duplicates():
    from lotus_deploy.recipe.stages import CriterionName, InstantSoup

    assert set(CRITERIA) == set(typing.get_args(CriterionName))
    assert set(typing.get_args(InstantSoup.model_fields["criterion"].annotation)) <= set(CRITERIA)
    with pytest.raises(KeyError, match="already registered"):
        CRITERIA.add("wanda", Magnitude("wanda"))
    assert statistic_for(["magnitude"]) is None and statistic_for(["wanda", "magnitude"]) == "norms"
    assert statistic_for(["wanda", "sparsegpt"]) == "gram"


@pytest.mark.parametrize("total, sizes, floors, want", [
    (10, [10, 10], None, [5, 5]),
    (3, [4, 4, 4, 4], None, [1, 1, 1, 0]),
    (7, [10, 20], None, [2, 5]),  # 7/30 of each: 2.33 -> 2, 4.67 -> 5
    (10, [10, 10], [8, 0], [8, 2]),  # a part already past the share keeps its floor
    (4, [10, 10], [3, 3], [3, 3]),  # the floors exceed the total: the floors win
])
def test_spread(total, sizes, floors, want):
    assert spread(total, sizes, floors) == want


def test_calibration_accumulates_inputs_without_changing_the_model(micro_model):
    name = "blocks.0.mlp.fc1.weight"
    seen = []
    h = micro_model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    before = {k: v.clone() for k, v in micro_model.state_dict().items()}
    micro_model.train()
    cal = calibrate(micro_model, [name], images().split(8), "gram")
    h.remove()
    x = torch.cat(seen)  # (N·T, K)
    assert cal.tokens[name] == x.shape[0] == 24 * 17 and cal.images == 24  # 16 patches + CLS
    torch.testing.assert_close(cal.gram[name], x.T @ x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(cal.sq[name], torch.diagonal(cal.gram[name]), rtol=1e-4, atol=1e-3)
    assert micro_model.training and not micro_model.blocks[0].mlp.fc1._forward_hooks
    assert all(torch.equal(v, before[k]) for k, v in micro_model.state_dict().items())
    with pytest.raises(ValueError, match="nn.Linear"):
        calibrate(micro_model, ["patch_embed.proj.weight"], images().split(8))


def test_calibration_follows_a_token_dropping_forward(micro_model):
    from lotus_deploy.prune.tickets import forward_tokens

    x = images(8)
    idx = torch.arange(6).repeat(8, 1)  # (B, K): keep 6 of the 16 patches
    cal = calibrate(micro_model, ["blocks.1.attn.qkv.weight"], [(x, idx)], forward=lambda x, i: forward_tokens(micro_model, x, i))
    assert cal.tokens["blocks.1.attn.qkv.weight"] == 8 * (6 + 1) and cal.images == 8  # kept patches + CLS


@pytest.mark.parametrize("criterion, granularity", COMBOS)
@pytest.mark.parametrize("sparsity", [0.3, 0.55])
def test_masks_hit_the_sparsity_exactly(calibrated, criterion, granularity, sparsity):
    model, names, cal = calibrated
    weights = select_weights(model, SCOPE)
    existing = prune_masks(model, SCOPE, 0.2, "per_layer")
    for ex in (None, existing):
        pruned = prune_model(model, SCOPE, sparsity, granularity, ex, criterion, cal)
        zeros = {k: int((~m).sum()) for k, m in pruned.masks.items()}
        if granularity == "global":
            assert sum(zeros.values()) == round(sparsity * sum(w.numel() for w in weights.values()))
        else:
            assert all(zeros[k] == round(sparsity * weights[k].numel()) for k in names)
        if granularity == "per_row" and ex is None:  # rows differ by at most one zero (no floors)
            assert all(int(c.max() - c.min()) <= 1 for c in ((~m).sum(1) for m in pruned.masks.values()))
        if ex is not None:
            assert all(bool((pruned.masks[k] <= ex[k]).all()) for k in names)
        assert set(pruned.weights) == (set(names) if criterion == "sparsegpt" else set())


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_two_four_is_exact_and_inside_masks_in_force(calibrated, criterion):
    from lotus_deploy.prune.semi_structured import semi_structured_prune

    model, names, cal = calibrated
    existing = prune_masks(model, SCOPE, 0.3, "global")
    for ex in ({}, existing):
        pruned, skipped = semi_structured_prune(model, SCOPE, ex, criterion, cal)
        assert set(pruned.masks) == set(names) and not skipped
        for k, m in pruned.masks.items():
            assert is_two_four(m, 1)
            if not ex:  # exactly 2 of every 4
                assert bool((m.view(m.shape[0], -1, 4).sum(-1) == 2).all())
            else:
                assert bool((m <= ex[k]).all())
            if criterion == "sparsegpt":
                assert is_two_four(pruned.weights[k], 1) and bool((pruned.weights[k][~m] == 0).all())


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_masked_weights_stay_zero_in_the_model(calibrated, criterion):
    model, names, _ = calibrated
    existing = prune_masks(model, SCOPE, 0.3, "global")
    apply_masks_(model, existing)
    cal = calibrate(model, names, images().split(8), "gram")  # on the masked model, as a stage runs
    pruned = prune_model(model, SCOPE, 0.5, "per_layer", existing, criterion, cal)
    masks = {**existing, **pruned.masks}
    apply_pruned_(model, pruned, masks)
    params = dict(model.named_parameters())
    for k in names:
        assert bool((params[k][~existing[k]] == 0).all()) and bool((params[k][~masks[k]] == 0).all())
        assert float((params[k] == 0).float().mean()) == pytest.approx(0.5, abs=1 / params[k].numel())


def test_magnitude_criterion_equals_prune_masks(micro_model):
    existing = prune_masks(micro_model, SCOPE, 0.2, "per_layer")
    for g in ("global", "per_layer"):
        for ex in (None, existing):
            want = prune_masks(micro_model, SCOPE, 0.45, g, ex)
            got = prune_model(micro_model, SCOPE, 0.45, g, ex)
            assert got.weights == {} and all(torch.equal(want[k], got.masks[k]) for k in want)


def test_sparsegpt_reconstructs_better_than_magnitude_on_the_calibration_inputs(calibrated):
    model, names, cal = calibrated
    params = dict(model.named_parameters())
    for s in (0.3, 0.5):
        sg = prune_model(model, SCOPE, s, "per_layer", None, "sparsegpt", cal)
        mag = prune_model(model, SCOPE, s, "per_layer")
        for k in names:
            w, g = params[k].detach(), cal.gram[k]
            assert reconstruction_error(w, sg.weights[k], g) < reconstruction_error(w, w * mag.masks[k], g), (k, s)
    w = params[names[0]].detach()
    m, w24 = sparsegpt_prune(w, cal.gram[names[0]], nm=(2, 4))
    assert reconstruction_error(w, w24, cal.gram[names[0]]) < reconstruction_error(w, w * two_four_masks(w), cal.gram[names[0]])


def test_wanda_beats_magnitude_on_skewed_channel_norms():
    g = torch.Generator().manual_seed(0)
    out, k, n = 48, 64, 4096
    scale = torch.logspace(-1.5, 1.5, k)[torch.randperm(k, generator=g)]  # channel norms over 3 decades
    x = torch.randn(n, k, generator=g) * scale  # (N·T, K), independent channels
    w = torch.randn(out, k, generator=g)
    gram = x.T @ x
    lin = torch.nn.Linear(k, out, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    cal = calibrate(torch.nn.Sequential(lin), ["0.weight"], x.split(512), "gram")
    for gran in ("global", "per_row"):
        wanda = CRITERIA["wanda"].prune({"0.weight": w}, 0.5, gran, stats=cal).masks["0.weight"]
        mag = CRITERIA["magnitude"].prune({"0.weight": w}, 0.5, gran).masks["0.weight"]
        assert reconstruction_error(w, w * wanda, gram) < reconstruction_error(w, w * mag, gram)
    w24 = CRITERIA["wanda"].two_four({"0.weight": w}, stats=cal).masks["0.weight"]
    assert reconstruction_error(w, w * w24, gram) < reconstruction_error(w, w * two_four_masks(w), gram)


@pytest.mark.parametrize("criterion, granularity", [("wanda", "per_row"), ("sparsegpt", "global")])
def test_sweep_with_a_criterion_restores_the_model(calibrated, criterion, granularity):
    model, names, cal = calibrated
    before = {k: v.clone() for k, v in model.state_dict().items()}
    points = [0.2, 0.5]
    rows = sweep(model, SCOPE, points, lambda: {"top1": 0.0, "seconds": 0.0}, granularity, None, criterion, cal)
    assert [r["target"] for r in rows] == points
    assert [r["sparsity"] for r in rows] == pytest.approx(points, abs=1e-3) and all(r["prune_s"] >= 0 for r in rows)
    one = prune_model(model, SCOPE, 0.5, granularity, None, criterion, cal)
    assert rows[1]["masks_hash"] == masks_hash(one.masks)  # each point equals a fresh one-shot prune
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_criteria_refuse_what_they_cannot_do(calibrated):
    model, _, cal = calibrated
    with pytest.raises(ValueError, match="granularity"):
        prune_model(model, SCOPE, 0.5, "per_row", None, "sparsegpt", cal)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, SCOPE, 0.5, "global", None, "wanda")
    with pytest.raises(KeyError, match="unknown pruning criterion"):
        prune_model(model, SCOPE, 0.5, "global", None, "obs")


# ----------------------------------------------------------------------------- against NVIDIA ModelOpt


def _modelopt():
    try:
        from modelopt.torch.sparsity.weight_sparsity.magnitude import create_asp_mask
        from modelopt.torch.sparsity.weight_sparsity.sparsegpt import create_sgpt_mask
    except Exception as e:  # noqa: BLE001 — absent, or a missing dependency of it
        pytest.skip(f"nvidia-modelopt's weight sparsity is not importable here ({type(e).__name__}: {e}); pip install nvidia-modelopt requests")
    return create_asp_mask, create_sgpt_mask


def test_two_four_masks_match_modelopt_on_one_layer():
    """ModelOpt's ``sparse_magnitude`` and ``sparsegpt`` 2:4 masks equal ours on a 256-input layer (two 128-column blocks)."""
    create_asp_mask, create_sgpt_mask = _modelopt()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 256, generator=g) * torch.rand(256, generator=g) * 3  # (N·T, K)
    x = x + 0.3 * x.roll(1, dims=1)  # correlated neighbours: OBS updates matter
    w = torch.randn(64, 256, generator=g)
    gram = x.T @ x
    assert torch.equal(create_asp_mask(w, "2:4 sparsity"), two_four_masks(w))
    cfg = {"hessian_damp": 0.01, "pattern": "2:4 sparsity", "col_block_size": 128, "row_block_size": -1}
    theirs = create_sgpt_mask(w.clone(), gram.clone(), cfg)  # ModelOpt scales H by 2/N: same masks
    ours, w24 = sparsegpt_prune(w, gram, nm=(2, 4))
    assert torch.equal(theirs, ours)
    assert reconstruction_error(w, w24, gram) < reconstruction_error(w, w * two_four_masks(w), gram)

