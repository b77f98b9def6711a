"""lotus bench: backends and skip reasons, timing, model facts, variants, results schema, Pareto
front, report files and plots, comparisons, and a CPU bench of a tiny run end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lotus_deploy.bench.backends import (
    BACKENDS,
    Backend,
    BackendContext,
    resolve_backends,
)
from lotus_deploy.bench.report import (
    compare,
    compare_markdown,
    front_line,
    mark_pareto,
    pareto_front,
    write_outputs,
)
from lotus_deploy.bench.run import (
    BenchResults,
    ResultsError,
    Timed,
    latency_stats,
    load_results,
    percentile,
    resolve_variants,
    run_bench,
    sweep_efficiency,
    time_arms,
)
from lotus_deploy.errors import RunError
from lotus_deploy.recipe.base import BenchConfig
from lotus_deploy.run import Run

GPU_BACKENDS = ["torch_cuda_fp32", "torch_cuda_fp16", "torch_cuda_bf16", "torch_compile_cuda_fp16", "torch_2to4_fp16",
                "onnxruntime_cuda", "onnxruntime_tensorrt", "tensorrt"]
PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- backends


def test_every_issue_backend_is_registered():
    assert set(BACKENDS) >= {"torch_cpu", "torch_compile_cpu", "onnxruntime_cpu", *GPU_BACKENDS}


@pytest.mark.parametrize("name", ["torch_cpu", "onnxruntime_cpu"])
def test_cpu_backends_are_available(name):
    assert BACKENDS[name].available() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the GPU backends may be available")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backends_skip_with_a_reason_without_cuda(name):
    why = BACKENDS[name].available()
    assert isinstance(why, str) and len(why) > 20
    assert any(w in why for w in ("CUDA", "GPU", "tensorrt", "TensorRT")), why


def test_resolve_backends_auto_all_and_unknown():
    auto = [b.name for b in resolve_backends(["auto"])]
    assert "torch_cpu" in auto and "onnxruntime_cpu" in auto
    assert "torch_compile_cpu" not in auto and "torch_compile_cuda_fp16" not in auto  # compile is opt-in
    assert [b.name for b in resolve_backends(["all"])] == list(BACKENDS)
    assert [b.name for b in resolve_backends(["onnxruntime_cpu", "auto"])][0] == "onnxruntime_cpu"
    assert len({b.name for b in resolve_backends(["auto", "torch_cpu"])}) == len(auto)  # no repeats
    with pytest.raises(KeyError, match="known: .*torch_cpu"):
        resolve_backends(["nope"])


def test_registering_a_backend_twice_fails():
    with pytest.raises(KeyError, match="already registered"):
        BACKENDS.add("torch_cpu", BACKENDS["torch_cpu"])


@pytest.mark.parametrize("name", ["torch_cpu", "onnxruntime_cpu"])
def test_cpu_backend_predicts_like_the_model(name, micro_model, tmp_path):
    from lotus_deploy.export.onnx_export import export_onnx

    x = torch.randn(5, 3, 32, 32)
    onnx = export_onnx(micro_model, tmp_path / "m.onnx", x[:1])
    ctx = BackendContext(onnx, tmp_path, threads=1, batch_sizes=[1, 5], input_shape=(3, 32, 32))
    p = BACKENDS[name].prepare(micro_model, ctx)
    with torch.no_grad():
        ref = micro_model(x)
    got = p.predict(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- timing


def test_percentile_matches_linear_interpolation():
    vals = sorted(random.Random(0).uniform(0, 10) for _ in range(37))
    np = pytest.importorskip("numpy")
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, 100 * q)))


def test_latency_stats_known_values():
    s = latency_stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0 and s["iters"] == 5
    assert s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["mean_ms"] == pytest.approx(22.0)


def test_time_arms_interleaves_and_counts():
    calls: list[str] = []
    arms = {n: Timed(lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    res = time_arms(arms, warmup=2, iters=6, rounds=3)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, arm by arm
    timed = calls[6:]
    assert all(res[n]["iters"] == 6 for n in arms) and len(timed) == 18
    # 3 rounds of 2 calls per arm, the order rotating between rounds
    assert [timed[i] for i in (0, 6, 12)] == ["a", "b", "c"]
    assert set(timed[:6]) == set(timed[6:12]) == {"a", "b", "c"}


def test_time_arms_min_seconds_extends_timing():
    import time

    res = time_arms({"sleep": Timed(lambda: time.sleep(0.004))}, warmup=0, iters=1, min_seconds=0.05, rounds=1)
    s = res["sleep"]
    assert s["iters"] >= 10 and s["median_ms"] >= 4.0 and s["timer"] == "wall"


# ----------------------------------------------------------------------------- model facts and variants


def test_two_four_layers_counts_only_eligible_2_4_along_in_features():
    from lotus_deploy.prune.two_four import two_four_layers

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 16), torch.nn.Linear(20, 8))
    with torch.no_grad():
        w = m[0].weight  # (8, 32): zero the 2 smallest of every group of 4 along dim 1
        g = w.reshape(8, 8, 4)
        idx = g.abs().argsort(-1)[..., :2]
        g.scatter_(-1, idx, 0.0)
        m[1].weight.zero_()  # in_features 8 is not a multiple of 16: not eligible for sparse kernels
        m[2].weight.zero_()  # in_features 20: not eligible either
    assert two_four_layers(m) == ["0"]
    with torch.no_grad():
        m[0].weight[0, :4] = 1.0  # one group of 4 fully dense
    assert two_four_layers(m) == []


def _run(tiny_run) -> Run:
    return Run(tiny_run)


@pytest.mark.slow
def test_resolve_variants_all_and_aliases(tiny_run):
    run = _run(tiny_run)
    vs = resolve_variants(run, ["all"])
    names = [v["name"] for v in vs]
    assert names[0] == "initial" and "magnitude_prune" in names and "recover" in names
    shas = [v["entry"]["artifacts"]["model"]["sha256"] for v in vs]
    assert len(set(shas)) == len(shas)  # one entry per distinct checkpoint
    aliases = {a: v["name"] for v in vs for a in v["aliases"]}
    assert aliases["dense"] == "train" and aliases["final"] in names
    one = resolve_variants(run, ["dense", "train"])
    assert [(v["name"], v["aliases"]) for v in one] == [("dense", ["train"])]
    with pytest.raises(RunError, match="no variant 'nope'"):
        resolve_variants(run, ["nope"])


def test_sweep_efficiency_from_manifest():
    manifest = {"stages": [
        {"name": "sweep", "kind": "essential_sparsity", "status": "done", "wall_s": 30.0,
         "metrics": {"evaluations": 11, "sweep_wall_s": 22.0, "cost_ratio": 1.02, "table": [{}] * 10}},
        {"name": "sweep2", "kind": "essential_sparsity", "status": "done", "wall_s": 5.0, "metrics": {}},
        {"name": "ft", "kind": "finetune", "status": "done", "wall_s": 5.0, "metrics": {"points": 3}},
    ]}
    out = sweep_efficiency(manifest, eval_images=100, forward_images_per_s=50.0)
    assert [s["stage"] for s in out] == ["sweep", "sweep2"]
    assert out[0]["points"] == 11 and out[0]["ideal_s"] == pytest.approx(22.0) and out[0]["ratio"] == pytest.approx(1.0)
    assert out[0]["wall_s"] == 22.0 and out[0]["stage_cost_ratio"] == 1.02
    assert out[1]["ratio"] is None and "do not say" in out[1]["note"]


# ----------------------------------------------------------------------------- Pareto front


@pytest.mark.parametrize(
    "points, expected",
    [
        pytest.param([(1, 50), (2, 60), (3, 55), (4, 70)], [True, True, False, True], id="staircase"),
        pytest.param([(1, 50), (1, 50)], [True, True], id="ties-both-on"),
        pytest.param([(1, 50), (1, 40)], [True, False], id="same-latency-less-accurate"),
        pytest.param([(2, 50), (1, 50)], [False, True], id="same-accuracy-slower"),
        pytest.param([(5, 90)], [True], id="single"),
    ],
)
def test_pareto_front_synthetic(points, expected):
    assert pareto_front(points) == expected


def test_pareto_front_random_points_invariants():
    rng = random.Random(1)
    pts = [(rng.uniform(1, 100), rng.uniform(0, 100)) for _ in range(200)]
    on = pareto_front(pts)
    front = [p for p, o in zip(pts, on) if o]
    dominates = lambda a, b: a[0] <= b[0] and a[1] >= b[1] and a != b  # noqa: E731
    assert front and all(not any(dominates(q, p) for q in pts) for p in front)
    assert all(any(dominates(q, p) for q in front) for p, o in zip(pts, on) if not o)
    line = front_line(pts)
    assert [p[0] for p in line] == sorted(p[0] for p in line)
    assert all(a[1] < b[1] for a, b in zip(line, line[1:]))  # slower points on the front are more accurate


def test_mark_pareto_per_backend_and_batch_table():
    rows = [
        {"backend": "x", "batch": 1, "latency_median_ms": 1.0, "top1": 50.0},
        {"backend": "x", "batch": 1, "latency_median_ms": 2.0, "top1": 40.0},
        {"backend": "y", "batch": 1, "latency_median_ms": 9.0, "top1": 40.0},  # alone in its table
        {"backend": "x", "batch": 8, "latency_median_ms": 3.0, "top1": None},  # no accuracy: never marked
    ]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, False, True, False]


# ----------------------------------------------------------------------------- results, reports, plots


def _row(variant, backend, batch, ms, top1, sparsity=0.0):
    return {
        "variant": variant, "backend": backend, "batch": batch, "top1": top1, "agreement": 1.0,
        "latency_median_ms": ms, "latency_p90_ms": 1.1 * ms, "latency_p99_ms": 1.2 * ms, "latency_mean_ms": ms,
        "latency_min_ms": 0.9 * ms, "latency_std_ms": 0.05 * ms, "iters": 10, "timer": "wall",
        "images_per_s": batch / (ms / 1e3), "scope_sparsity": sparsity, "nonzeros": 100, "params": 200, "two_four_layers": 0,
    }


def synthetic_results(scale: float = 1.0, accuracy: bool = True) -> BenchResults:
    """Two variants x two backends x two batch sizes; latencies multiplied by ``scale``."""
    variants = [("dense", 0.0, 80.0, 1.0), ("pruned", 0.5, 78.0, 0.7)]
    rows = [
        _row(v, b, bs, scale * ms * f * bs ** 0.5, top1 if accuracy else None, sp)
        for v, sp, top1, f in variants for b, ms in (("torch_cpu", 10.0), ("onnxruntime_cpu", 6.0)) for bs in (1, 8)
    ]
    mark_pareto(rows)
    facts = [{
        "variant": v, "aliases": [], "checkpoint": f"stages/{v}/model.safetensors", "weights_sha256": "0" * 64,
        "params": 200, "nonzeros": int(200 * (1 - sp)), "sparsity": sp, "scope": ["blocks.*"], "scope_params": 100,
        "scope_nonzeros": int(100 * (1 - sp)), "scope_sparsity": sp, "linear_layers": 4, "two_four_layers": 0,
        "two_four_layer_names": [], "checkpoint_bytes": 1000, "onnx_bytes": 1200, "reference_top1": top1 if accuracy else None,
    } for v, sp, top1, _ in variants]
    acc = [{"variant": v, "backend": b, "top1": top1, "images": 100, "agreement": 1.0, "max_abs_logit_diff": 1e-6, "seconds": 0.1}
           for v, _, top1, _ in variants for b in ("torch_cpu", "onnxruntime_cpu")] if accuracy else []
    return BenchResults.model_validate({
        "created": "2026-01-01T00:00:00+00:00", "run": "runs/synthetic", "recipe": "synthetic",
        "protocol": {
            "model": "m", "img_size": 32, "eval_images": 100, "eval_subset": 100, "subset_seed": 0, "accuracy_batch": 8,
            "batch_sizes": [1, 8], "warmup": 1, "iters": 10, "min_seconds": 0.0, "rounds": 5, "interleave": "variants", "threads": 1,
            "weights_file_sha256": None, "timing": "synthetic",
        },
        "environment": {"cpu": "test cpu", "cpu_count": 2, "torch": torch.__version__},
        "backends": [
            {"name": "torch_cpu", "description": "", "device": "cpu", "status": "measured"},
            {"name": "onnxruntime_cpu", "description": "", "device": "cpu", "status": "measured"},
            {"name": "tensorrt", "description": "", "device": "cuda", "status": "skipped", "reason": "no GPU here"},
        ],
        "variants": facts, "accuracy": acc, "rows": rows,
        "pipeline": {"variant": "dense", "device": "cpu", "batch_size": 8, "images": 100, "cache_eval": True,
                     "loop_images_per_s": 90.0, "forward_images_per_s": 100.0, "efficiency": 0.9, "sweeps": []},
    })


def test_results_schema_round_trip(tmp_path):
    res = synthetic_results()
    write_outputs(res, tmp_path)
    back = load_results(tmp_path)  # a bench folder
    assert back == res
    assert load_results(tmp_path / "results.json").model_dump(mode="json") == res.model_dump(mode="json")
    assert json.loads((tmp_path / "results.json").read_text())["version"] == 2


@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(lambda d: d.pop("format"), "not a lotus bench results file", id="no-format"),
        pytest.param(lambda d: d.update(version=1), "results version 1", id="old-version"),
        pytest.param(lambda d: d["rows"][0].pop("latency_median_ms"), "does not match the results schema", id="missing-field"),
        pytest.param(lambda d: d.update(extra=1), "does not match the results schema", id="unknown-field"),
    ],
)
def test_load_results_rejects_bad_files(tmp_path, mutate, match):
    d = synthetic_results().model_dump(mode="json")
    mutate(d)
    (tmp_path / "results.json").write_text(json.dumps(d))
    with pytest.raises(ResultsError, match=match):
        load_results(tmp_path / "results.json")


def test_load_results_missing_says_what_to_do(tmp_path):
    with pytest.raises(ResultsError, match="lotus bench RUN"):
        load_results(tmp_path)


@pytest.mark.parametrize("accuracy", [True, False], ids=["with-accuracy", "latency-only"])
def test_report_files_and_plots_written(tmp_path, accuracy):
    res = synthetic_results(accuracy=accuracy)
    paths = write_outputs(res, tmp_path)
    for key in ("pareto_png", "sparsity_png"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    csv_lines = paths["results_csv"].read_text().splitlines()
    assert len(csv_lines) == 1 + len(res.rows) and csv_lines[0].startswith("variant,backend,batch")
    md = paths["report_md"].read_text()
    for backend in ("torch_cpu", "onnxruntime_cpu"):
        for bs in (1, 8):
            assert f"### {backend}, batch {bs}" in md
    assert "`tensorrt` (skipped): no GPU here" in md and "efficiency" in md
    assert ("| ★ |" in md) == accuracy


def test_compare_ratios_and_unmatched():
    a, b = synthetic_results(), synthetic_results(scale=2.0)
    b.rows = b.rows[:-1]  # one row only in A
    c = compare(a, b)
    assert c["summary"]["matched"] == len(a.rows) - 1
    assert all(r["median_ratio"] == pytest.approx(2.0) and r["images_per_s_ratio"] == pytest.approx(0.5) for r in c["rows"])
    assert c["summary"]["median_ratio_geomean"] == pytest.approx(2.0) and c["summary"]["within_10pct"] == 0
    assert c["only_a"] == [list((a.rows[-1].variant, a.rows[-1].backend, a.rows[-1].batch))] and c["only_b"] == []
    md = compare_markdown(c)
    assert "2.000" in md and "Only in A" in md


def test_cli_compare_two_result_files(tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    write_outputs(synthetic_results(), tmp_path / "a")
    write_outputs(synthetic_results(scale=1.05), tmp_path / "b")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "a" / "results.json"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert "1.050" in r.output and f"{len(synthetic_results().rows)} of {len(synthetic_results().rows)} within 10%" in r.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]["matched"] == 8
    bad = CliRunner().invoke(main, ["bench", str(tmp_path / "a"), str(tmp_path / "cmp")])
    assert bad.exit_code == 2 and "no bench results" in bad.output


# ----------------------------------------------------------------------------- end to end on a tiny run


@pytest.fixture(scope="module")
def tiny_bench(tiny_run, tmp_path_factory):
    """One CPU bench of every variant of the shared tiny run (the run itself is left untouched)."""
    cfg = BenchConfig(
        variants=["all"], backends=["torch_cpu", "onnxruntime_cpu", "torch_cuda_fp16", "tensorrt"],
        batch_sizes=[1, 4], warmup=1, iters=3, rounds=3, threads=1,
    )
    out = tmp_path_factory.mktemp("bench")
    logs: list[str] = []
    results = run_bench(Run(tiny_run), cfg, out, log=logs.append)
    return results, out, logs


@pytest.mark.slow
def test_tiny_bench_end_to_end(tiny_bench, tiny_run):
    results, out, logs = tiny_bench
    for f in ("results.json", "results.csv", "report.md", "pareto.png", "sparsity.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not (tiny_run / "bench").exists()  # wrote only where it was told
    res = load_results(out)
    assert res.model_dump(mode="json") == results
    names = [v.variant for v in res.variants]
    assert names[0] == "initial" and {"train", "magnitude_prune", "recover"} <= set(names)
    assert len(res.rows) == len(names) * 2 * 2  # variants x measured backends x batch sizes
    status = {b.name: b for b in res.backends}
    assert status["torch_cpu"].status == status["onnxruntime_cpu"].status == "measured"
    if not torch.cuda.is_available():
        assert status["torch_cuda_fp16"].status == "skipped" and "CUDA" in status["torch_cuda_fp16"].reason
        assert status["tensorrt"].status == "skipped" and status["tensorrt"].reason
    pruned = next(v for v in res.variants if v.variant == "magnitude_prune")
    assert pruned.scope_sparsity == pytest.approx(0.5, abs=0.01) and pruned.nonzeros < pruned.params
    for a in res.accuracy:  # ONNX Runtime's own outputs give the same classes as PyTorch
        assert a.images == 100 and a.agreement == 1.0 and a.max_abs_logit_diff < 1e-3
        assert a.top1 == next(v.reference_top1 for v in res.variants if v.variant == a.variant)
    for r in res.rows:
        assert 0 < r.latency_min_ms <= r.latency_median_ms <= r.latency_p90_ms <= r.latency_p99_ms
        assert r.iters >= 3 and r.images_per_s == pytest.approx(r.batch / (r.latency_median_ms / 1e3))
        assert r.h2d_median_ms is None  # CPU backends: no copies
    assert any(r.pareto for r in res.rows)
    assert res.pipeline and res.pipeline.images == 100 and res.pipeline.efficiency > 0
    assert res.environment["bench_threads"] == 1 and res.protocol.threads == 1
    assert any("skipping torch_cuda_fp16" in m for m in logs) or torch.cuda.is_available()


@pytest.mark.slow
def test_failing_backend_is_recorded_not_fatal(tiny_run, tmp_path, monkeypatch):
    def boom(model, ctx):
        raise RuntimeError("kaput")

    monkeypatch.setitem(BACKENDS._items, "failing_test", Backend("failing_test", False, lambda: None, boom, "always fails"))
    cfg = BenchConfig(variants=["dense", "final"], backends=["torch_cpu", "failing_test"], batch_sizes=[2], warmup=0, iters=2,
                      threads=1, pipeline=False, interleave="backends")
    run_bench(Run(tiny_run), cfg, tmp_path, log=lambda m: None)
    res = load_results(tmp_path)
    st = {b.name: b for b in res.backends}
    assert st["failing_test"].status == "failed" and "kaput" in st["failing_test"].reason
    assert [(f.variant, f.backend) for f in res.failures] == [("dense", "failing_test"), ("final", "failing_test")]
    assert st["torch_cpu"].status == "measured" and [(r.variant, r.backend) for r in res.rows] == [("dense", "torch_cpu"), ("final", "torch_cpu")]
    assert res.pipeline is None and "kaput" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_cli_bench_then_compare_same_run(tiny_run, tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    args = ["--variants", "final", "--backends", "onnxruntime_cpu", "--batch", "2", "--iters", "3", "--threads", "1", "--no-accuracy"]
    for side in ("a", "b"):
        r = CliRunner().invoke(main, ["bench", str(tiny_run), *args, "--out", str(tmp_path / side)])
        assert r.exit_code == 0, r.output
        assert f"report: {tmp_path / side / 'report.md'}" in r.output
    res = load_results(tmp_path / "a")
    assert [(x.variant, x.backend, x.batch, x.top1) for x in res.rows] == [("final", "onnxruntime_cpu", 2, None)]
    c = CliRunner().invoke(main, ["bench", str(tmp_path / "a"), str(tmp_path / "b")])
    assert c.exit_code == 0 and "| final | onnxruntime_cpu | 2 |" in c.output
    bad = CliRunner().invoke(main, ["bench", str(tiny_run), "--variants", "nope", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "no variant 'nope'" in bad.output
    bad = CliRunner().invoke(main, ["bench", str(tiny_run), "--backends", "nope", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "unknown bench backend 'nope'" in bad.output


@pytest.mark.slow
def test_bench_stage_reports_rows_skips_and_artifacts(tiny_run, tmp_path):
    import shutil

    from lotus_deploy.recipe.stages import Bench
    from lotus_deploy.stages import stage_fn

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    state = Run(run_dir).state("final", quiet=True)
    state.recipe.bench = BenchConfig(variants=["final"], backends=["onnxruntime_cpu", "torch_cuda_fp16"], batch_sizes=[1],
                                     warmup=0, iters=2, threads=1, pipeline=False)
    cfg = Bench()
    result = stage_fn(cfg)(cfg, state)
    assert not result.model_changed
    assert set(result.artifacts) == {"results_json", "results_csv", "report_md", "pareto_png", "sparsity_png"}
    assert all(p.is_file() and p.parent == run_dir / "bench" for p in result.artifacts.values())
    assert [(r["variant"], r["backend"], r["batch"]) for r in result.metrics["rows"]] == [("final", "onnxruntime_cpu", 1)]
    if not torch.cuda.is_available():
        assert [s["backend"] for s in result.metrics["skipped"]] == ["torch_cuda_fp16"]
    assert result.metrics["pipeline_efficiency"] is None
