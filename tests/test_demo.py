"""The shipped offline demo recipe end to end (tiny ViT on digits: train, prune 50%, recover, ...)."""

from __future__ import annotations

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

# What a user may rely on on any x86 CPU. Measured in benchmarks/results/demo_seeds.md
# (benchmarks/demo_seeds.py, seeds 0-4 x torch threads 1 and 2, 2-core Xeon with AVX-512 VNNI,
# torch 2.14.1): dense top-1 95.33-97.33 %, final 96.00-97.78 %, final at worst 0.44 point below
# dense. Another CPU's kernels (AVX2, AVX-512, AMX) or thread count round differently and move
# the result as another seed does (the previous recipe: 86.67-97.11 % over the same runs), so
# the thresholds sit below the lowest value measured, not at it: 92 % keeps the README's 90 %
# goal with 2 points to spare and is 3.3 points under the measured minimum. This test runs at
# one thread (conftest), i.e. the table's threads-1, seed-0 row: 96.89 % dense, 96.67 % final.
DENSE_MIN = 92.0
FINAL_MIN = 92.0
PRUNED_MAX_DROP = 2.0
EXPECTED_KINDS = ["finetune", "magnitude_prune", "finetune", "bake", "export", "bench"]


def test_demo_recipe_end_to_end(tmp_path):
    from lotus_deploy.bench.facts import resolve_variants
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import load_recipe
    from lotus_deploy.run import Run

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    run_dir = compress(recipe, out=tmp_path / "demo", quiet=True)
    m = read_json(run_dir / "manifest.json")

    # every stage of the recipe ran, in order, and finished
    assert [e["kind"] for e in m["stages"]] == EXPECTED_KINDS
    assert [e["name"] for e in m["stages"]] == [s.name for s in recipe.stages]
    assert all(e["status"] == "done" for e in m["stages"]), [(e["name"], e["status"]) for e in m["stages"]]
    by = {e["kind"]: e for e in m["stages"]}  # one stage per kind but finetune (train, recover)

    dense = Run(run_dir).variants()["dense"]["metrics"]["top1"]
    final = [e["metrics"]["top1"] for e in m["stages"] if "top1" in e.get("metrics", {})][-1]
    print(f"demo: dense top-1 {dense:.2f}%, final top-1 {final:.2f}%")
    assert dense >= DENSE_MIN, f"dense top-1 {dense:.2f}% < {DENSE_MIN}% (see benchmarks/results/demo_seeds.md)"
    assert final >= FINAL_MIN, f"final top-1 {final:.2f}% < {FINAL_MIN}% (see benchmarks/results/demo_seeds.md)"
    assert final >= dense - PRUNED_MAX_DROP, f"pruned top-1 {final:.2f}% vs dense {dense:.2f}%"

    prune = by["magnitude_prune"]
    assert prune["metrics"]["scope_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert by["bake"]["metrics"]["baked_masks_hash"] == prune["metrics"]["masks_hash"]

    export = by["export"]["metrics"]
    assert export["top1_agreement"] == 1.0
    assert export["onnx_weight_zeros"] >= export["torch_weight_zeros"] > 0
    assert (run_dir / "export" / "model.onnx").is_file()

    bench = by["bench"]
    assert (run_dir / "bench" / "report.md").is_file()
    assert (run_dir / "bench" / "results.json").is_file()
    rows = bench["metrics"]["rows"]
    measured = {(r["variant"], r["backend"], r["batch"]) for r in rows}
    backends = {r["backend"] for r in rows}
    assert {"torch_cpu", "onnxruntime_cpu"} <= backends, backends
    # bench names a checkpoint by the first of its names (dense is the `train` stage's, final the last stage's)
    name_of = {n: v["name"] for v in resolve_variants(Run(run_dir), ["all"]) for n in (v["name"], *v["aliases"])}
    for variant in ("dense", "final"):
        for backend in backends:
            for batch in recipe.bench.batch_sizes:
                assert (name_of[variant], backend, batch) in measured, (variant, backend, batch, sorted(measured))
    # the bench's own accuracy pass agrees with the stages' evaluation (same eval split)
    for variant, top1 in (("dense", dense), ("final", final)):
        got = [r["top1"] for r in rows if r["variant"] == name_of[variant]]
        assert got and all(t == pytest.approx(top1, abs=0.5) for t in got), (variant, got, top1)
