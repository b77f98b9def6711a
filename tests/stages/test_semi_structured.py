"""The ``semi_structured`` stage in a run: layers made 2:4, skips and permutation reported, export checked."""

from __future__ import annotations

import copy

import pytest
import torch

from lotus_deploy.export.onnx_export import ExportError
from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.semi_structured import semi_structured_masks
from lotus_deploy.prune.two_four import is_two_four

BLOCK_LINEARS = {f"blocks.{b}.{l}.weight" for b in (0, 1) for l in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


@pytest.fixture(scope="module")
def ss_run(tmp_path_factory):
    """prune 30% -> 2:4 (with permutation, head in scope) -> recover -> bake -> export."""
    from conftest import TINY_RECIPE

    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"] = [
        {"kind": "finetune", "name": "train", "steps": 2, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.3},
        {"kind": "semi_structured", "scope": ["blocks.*", "head"], "permute": True, "permute_seconds": 0.5},
        {"kind": "finetune", "name": "recover", "steps": 2, "lr": 5e-4},
        {"kind": "bake"},
        {"kind": "export"},
    ]
    return compress(parse_recipe(raw), out=tmp_path_factory.mktemp("runs") / "ss", quiet=True)


def stage(run_dir, kind):
    from lotus_deploy.files import read_json

    return next(e for e in read_json(run_dir / "manifest.json")["stages"] if e["kind"] == kind)


def test_stage_reports_layers_skips_and_permutation(ss_run):
    m = stage(ss_run, "semi_structured")["metrics"]
    assert set(m["two_four_layers"]) == BLOCK_LINEARS
    assert m["skipped"] == {"head.weight": "out_features 10 is not a multiple of 8"}
    assert m["two_four_sparsity"] >= 0.5 and m["scope_sparsity"] > 0.3
    assert set(m["small_layers"]) == BLOCK_LINEARS  # width 32: flagged as too small to gain
    perm = m["permutation"]
    assert set(perm["layers"]) == {n for n in BLOCK_LINEARS if n.endswith(("proj.weight", "fc2.weight"))}
    for r in perm["layers"].values():
        assert r["kept_after"] >= r["kept_before"]
    for n, row in m["layers"].items():
        if n in perm["layers"]:
            assert row["kept_magnitude"] == pytest.approx(perm["layers"][n]["kept_after"])
            assert row["kept_magnitude_before_permute"] == pytest.approx(perm["layers"][n]["kept_before"])
    assert "permutations" in stage(ss_run, "semi_structured")["artifacts"]


def test_final_weights_are_two_four_after_recovery_and_bake(ss_run):
    from lotus_deploy.run import Run

    model, masks = Run(ss_run).load("final")
    assert masks == {}  # baked
    params = dict(model.named_parameters())
    assert all(is_two_four(params[n], 1) for n in BLOCK_LINEARS)
    assert not is_two_four(params["head.weight"], 1)


def test_export_stage_checked_every_two_four_layer_in_onnx(ss_run):
    t = stage(ss_run, "export")["metrics"]["two_four"]
    assert t["layers"] == t["checked"] == 8
    assert {r["op"] for r in t["onnx"].values()} == {"MatMul"}
    assert all(r["two_four"] and r["axis"] == 0 for r in t["onnx"].values())
    assert t["onnx"]["blocks.1.mlp.fc2.weight"]["node"].endswith("mlp/fc2/MatMul")


def test_export_of_a_variant_before_the_stage_skips_the_check(ss_run, tmp_path):
    from lotus_deploy.run import Run
    from lotus_deploy.stages.export import export_state
    from lotus_deploy.state import RunState

    metrics, _ = export_state(RunState.from_run(Run(ss_run), "dense", quiet=True), tmp_path)
    assert metrics["two_four"]["checked"] == 0 and "before the semi_structured stage" in metrics["two_four"]["skipped"]


def test_export_check_fails_when_the_pattern_is_lost(micro_model, tmp_path):
    from lotus_deploy.export.onnx_export import export_onnx
    from lotus_deploy.export.verify import verify_export_two_four

    masks, _ = semi_structured_masks(micro_model, ["blocks.*"])
    apply_masks_(micro_model, masks)
    with torch.no_grad():
        micro_model.blocks[1].mlp.fc1.weight[0, :4] = 1.0  # one dense group in PyTorch
    path = export_onnx(micro_model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))
    with pytest.raises(ExportError, match=r"no longer 2:4 in the PyTorch weights: \['blocks.1.mlp.fc1.weight'\]"):
        verify_export_two_four(path, micro_model, sorted(masks))
    ok = sorted(set(masks) - {"blocks.1.mlp.fc1.weight"})
    assert verify_export_two_four(path, micro_model, ok)["checked"] == 7


def test_recipe_validation():
    from conftest import TINY_RECIPE

    from lotus_deploy.recipe import RecipeError, parse_recipe

    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"] = [{"kind": "semi_structured", "permute_seconds": 0}, {"kind": "semi_structured", "bogus": 1}]
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw)
    locs = {p.loc for p in e.value.problems}
    assert {"stages.0.permute_seconds", "stages.1.bogus"} <= locs
    raw["stages"] = [{"kind": "semi_structured"}, {"kind": "bake"}]
    r = parse_recipe(raw)
    assert r.stages[0].scope == ["blocks.*"] and r.stages[0].permute is False


@pytest.mark.parametrize("earlier_mask", ["within", "revive"])
def test_earlier_mask_within_or_revive(earlier_mask, tiny_recipe_dict, tmp_path):
    """within: 2:4 inside the earlier mask (sparser than 50 %); revive: exactly 50 % in each 2:4 layer,
    the earlier zeros losing first, so the kept weights are a superset of the earlier kept non-zeros' top 2."""
    from lotus_deploy.files import load_tensors, read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    raw = tiny_recipe_dict
    raw["stages"] = [
        {"kind": "finetune", "name": "train", "steps": 2, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.6},
        {"kind": "semi_structured", "earlier_mask": earlier_mask},
    ]
    run = compress(parse_recipe(raw), out=tmp_path / earlier_mask, quiet=True)
    m = read_json(run / "manifest.json")
    prune, ss = m["stages"][1], m["stages"][2]
    before = load_tensors(run / prune["artifacts"]["masks"]["path"])
    after = load_tensors(run / ss["artifacts"]["masks"]["path"])
    assert ss["metrics"]["earlier_mask"] == earlier_mask
    for name in ss["metrics"]["two_four_layers"]:
        a, b = after[name].bool(), before[name].bool()
        assert is_two_four(a.float(), 1)
        if earlier_mask == "within":
            assert not (a & ~b).any() and a.float().mean() < 0.5  # a subset of the earlier mask
        else:
            assert a.float().mean() == 0.5  # exactly 2 of every 4
    weights = load_tensors(run / ss["artifacts"]["model"]["path"])
    for name, mask in after.items():
        assert not weights[name][~mask.bool()].any()  # zeros stay zero
