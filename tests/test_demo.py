"""The shipped offline demo recipe end to end (tiny ViT on digits: train, prune 50%, recover, ...)."""

from __future__ import annotations

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_demo_recipe_end_to_end(tmp_path):
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import load_recipe
    from lotus_deploy.run import Run

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    run_dir = compress(recipe, out=tmp_path / "demo", quiet=True)
    m = read_json(run_dir / "manifest.json")
    assert all(e["status"] == "done" for e in m["stages"]), [(e["name"], e["status"]) for e in m["stages"]]
    by = {e["name"]: e for e in m["stages"]}

    dense = Run(run_dir).variants()["dense"]["metrics"]["top1"]
    final = [e["metrics"]["top1"] for e in m["stages"] if "top1" in e.get("metrics", {})][-1]
    print(f"demo: dense top-1 {dense:.2f}%, final top-1 {final:.2f}%")
    assert dense >= 90.0, f"dense top-1 {dense:.2f}%"
    assert final >= dense - 2.0, f"pruned top-1 {final:.2f}% vs dense {dense:.2f}%"

    prune = next(e for e in m["stages"] if e["kind"] == "magnitude_prune")
    assert prune["metrics"]["scope_sparsity"] == pytest.approx(0.5, abs=1e-4)
    bake = next(e for e in m["stages"] if e["kind"] == "bake")
    assert bake["metrics"]["baked_masks_hash"] == prune["metrics"]["masks_hash"]
    if "export" in by:
        assert by["export"]["metrics"]["top1_agreement"] == 1.0
        assert by["export"]["metrics"]["onnx_weight_zeros"] >= by["export"]["metrics"]["torch_weight_zeros"] > 0
    if "bench" in by:
        assert (run_dir / "bench" / "report.md").is_file()
