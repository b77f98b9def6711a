"""Stages on a run state: finetune, magnitude_prune, evaluate, bake (and bake -> plain timm)."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

from lotus_deploy.masks import mask_sparsity, masks_hash, weight_stats
from lotus_deploy.recipe.stages import STAGE_CONFIGS
from lotus_deploy.scope import DEFAULT_SCOPE, select_weights
from lotus_deploy.stages import stage_fn
from lotus_deploy.state import RunState


@pytest.fixture(scope="module")
def digits_data():
    """The tiny recipe's digits data for a 32 px model, built once for the module."""
    from conftest import TINY_RECIPE

    from lotus_deploy.data import build_data
    from lotus_deploy.models import InputSpec
    from lotus_deploy.recipe.base import DataConfig

    spec = InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return build_data(DataConfig(**TINY_RECIPE["data"]), spec)


@pytest.fixture
def state(tmp_path, tiny_recipe, micro_model, digits_data):
    s = RunState(
        recipe=tiny_recipe, run_dir=tmp_path, device=torch.device("cpu"), model=micro_model, masks={},
        log=logging.getLogger("lotus.test"), stage_index=1, stage_name="stage", stage_dir=tmp_path / "stage",
    )
    s._data = digits_data
    return s


def run_stage(state, raw: dict):
    """Validate a stage config through the recipe's union, then run it on ``state``."""
    cfg = STAGE_CONFIGS[raw["kind"]].model_validate(raw)
    if cfg.name is None:
        cfg.name = cfg.kind
    state.stage_name = cfg.name
    return stage_fn(cfg)(cfg, state)


def scope_zeros(model) -> tuple[int, int]:
    w = select_weights(model, DEFAULT_SCOPE)
    return sum(int((t == 0).sum()) for t in w.values()), sum(t.numel() for t in w.values())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- finetune


def test_finetune_trains_and_reports(state):
    before = snapshot(state.model)
    res = run_stage(state, {"kind": "finetune", "steps": 3, "lr": 1e-3})
    assert res.model_changed
    assert set(res.metrics) >= {"top1", "top5", "eval_loss", "history"}
    assert 0.0 <= res.metrics["top1"] <= 100.0
    assert res.metrics["history"][-1]["step"] == 3
    assert res.metrics["history"][-1]["eval_images"] == 100  # the eval subset
    rows = list(csv.DictReader(res.artifacts["history"].open()))
    assert len(rows) == len(res.metrics["history"]) and "train_loss" in rows[0]
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())


def test_finetune_head_only(state):
    before = snapshot(state.model)
    run_stage(state, {"kind": "finetune", "train": "head", "steps": 2, "lr": 1e-2})
    changed = {k for k, v in state.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"head.weight", "head.bias"}


def test_finetune_keeps_state_masks(state):
    run_stage(state, {"kind": "magnitude_prune", "sparsity": 0.6})
    masks = state.masks
    run_stage(state, {"kind": "finetune", "steps": 3, "lr": 1e-2, "weight_decay": 0.3})
    assert state.masks is masks
    params = dict(state.model.named_parameters())
    for k, m in masks.items():
        assert (params[k][~m] == 0).all(), k


def test_finetune_is_seeded(state, micro_model):
    """Same stage index and seed -> bit-identical weights."""
    import copy

    other = copy.deepcopy(state)
    other.model = copy.deepcopy(micro_model)
    run_stage(state, {"kind": "finetune", "steps": 2})
    run_stage(other, {"kind": "finetune", "steps": 2})
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k]), k


# ----------------------------------------------------------------------------- magnitude_prune


@pytest.mark.parametrize("granularity", ["global", "per_layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_magnitude_prune_hits_target(state, sparsity, granularity):
    res = run_stage(state, {"kind": "magnitude_prune", "sparsity": sparsity, "granularity": granularity})
    z, n = scope_zeros(state.model)
    if granularity == "global":
        assert z == round(sparsity * n)
    else:  # rounded per tensor
        assert z == sum(round(sparsity * m.numel()) for m in state.masks.values())
    assert abs(z - sparsity * n) <= len(state.masks)
    assert res.metrics["scope_sparsity"] == pytest.approx(z / n)
    assert res.metrics["mask_sparsity"] == pytest.approx(z / n)
    assert res.metrics["masks_hash"] == masks_hash(state.masks)
    assert set(state.masks) == set(select_weights(state.model, DEFAULT_SCOPE))
    if granularity == "per_layer":
        for k, m in state.masks.items():
            assert int((~m).sum()) == round(sparsity * m.numel()), k
    whole = weight_stats(state.model)
    assert res.metrics["params"] == whole["params"] and res.metrics["nonzeros"] == whole["nonzeros"]


def test_magnitude_prune_leaves_out_of_scope_alone(state):
    before = snapshot(state.model)
    run_stage(state, {"kind": "magnitude_prune", "sparsity": 0.5, "scope": ["blocks.0.*"]})
    after = state.model.state_dict()
    assert set(state.masks) == {f"blocks.0.{lin}.weight" for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    for k in before:
        if k not in state.masks:
            assert torch.equal(before[k], after[k]), k


def test_second_prune_keeps_first_masks(state):
    run_stage(state, {"kind": "magnitude_prune", "sparsity": 0.5, "scope": ["blocks.0.*"]})
    first = {k: v.clone() for k, v in state.masks.items()}
    run_stage(state, {"kind": "magnitude_prune", "name": "again", "sparsity": 0.7})
    assert set(first) < set(state.masks)
    for k, m in first.items():
        assert not (state.masks[k] & ~m).any(), k
    assert mask_sparsity(state.masks) == pytest.approx(0.7, abs=1e-3)


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_reports_without_changing_the_model(state):
    run_stage(state, {"kind": "magnitude_prune", "sparsity": 0.4})
    before = snapshot(state.model)
    res = run_stage(state, {"kind": "evaluate"})
    assert not res.model_changed
    m = res.metrics
    assert m["images"] == 100 and 0 <= m["top1"] <= m["top5"] <= 100
    z, n = scope_zeros(state.model)
    assert m["scope_sparsity"] == pytest.approx(z / n) and m["scope_params"] == n
    assert m["params"] == sum(p.numel() for p in state.model.parameters())
    assert m["nonzeros"] == sum(int(torch.count_nonzero(p)) for p in state.model.parameters())
    assert m["model_sparsity"] == pytest.approx(1 - m["nonzeros"] / m["params"])
    for k, v in state.model.state_dict().items():
        assert torch.equal(before[k], v)


def test_evaluate_own_scope(state):
    res = run_stage(state, {"kind": "evaluate", "scope": ["head"]})
    assert res.metrics["scope_params"] == state.model.head.weight.numel()


# ----------------------------------------------------------------------------- bake


def test_bake_writes_zeros_and_drops_masks(state):
    run_stage(state, {"kind": "magnitude_prune", "sparsity": 0.5})
    h, masks = masks_hash(state.masks), dict(state.masks)
    res = run_stage(state, {"kind": "bake"})
    assert state.masks == {}
    assert res.metrics == {"baked_masks_hash": h, "baked_mask_sparsity": pytest.approx(0.5, abs=1e-3)}
    params = dict(state.model.named_parameters())
    for k, m in masks.items():
        assert (params[k][~m] == 0).all()


def test_baked_checkpoint_loads_into_plain_timm(tiny_run):
    """The baked safetensors is a plain timm state dict: same outputs as the masked model."""
    import timm

    from lotus_deploy.files import load_tensors, read_json
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.models import register_tiny_models
    from lotus_deploy.run import Run

    manifest = read_json(tiny_run / "manifest.json")
    bake = next(e for e in manifest["stages"] if e["kind"] == "bake")
    assert "masks" not in bake["artifacts"]
    sd = load_tensors(tiny_run / bake["artifacts"]["model"]["path"])

    register_tiny_models()
    plain = timm.create_model("lotus_vit_micro_patch8_32", num_classes=10)
    assert set(sd) == set(plain.state_dict())  # no mask buffers, no renamed weights
    plain.load_state_dict(sd, strict=True)
    plain.eval()

    masked, masks = Run(tiny_run).load("recover")  # the model right before bake, with its masks
    assert masks and masks_hash(masks) == bake["metrics"]["baked_masks_hash"]
    apply_masks_(masked, masks)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(x), masked(x))
    z, n = scope_zeros(plain)
    assert z == round(0.5 * n)
