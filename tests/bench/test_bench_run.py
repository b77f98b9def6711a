"""lotus_deploy.bench.run: accuracy from a backend's own outputs, and CPU benches of a tiny run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lotus_deploy.bench.backends import BACKENDS, Backend
from lotus_deploy.bench.results import load_results
from lotus_deploy.bench.run import accuracy_pass, run_bench
from lotus_deploy.recipe.base import BenchConfig
from lotus_deploy.run import Run
from lotus_deploy.state import RunState


def test_accuracy_pass_scores_the_predictors_own_logits():
    """Top-1 from what the predictor returns (numpy or torch), against the labels."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    labels_of = {id(x): y.numpy() for x, y in batches}
    perfect = accuracy_pass(lambda x: np.eye(3, dtype=np.float32)[labels_of[id(x)]], batches)
    assert perfect["top1"] == 100.0 and perfect["images"] == 12 and perfect["logits"].shape == (12, 3)
    wrong = accuracy_pass(lambda x: torch.eye(3)[(torch.from_numpy(labels_of[id(x)]) + 1) % 3], batches)
    assert wrong["top1"] == 0.0 and wrong["seconds"] >= 0


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
    assert status["onnxruntime_cpu"].info["providers"] == ["CPUExecutionProvider"]  # the predictor's details
    assert status["torch_cpu"].info["device"] == "cpu" and status["torch_cpu"].info["dtype"] == "float32"
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
    state = RunState.from_run(Run(run_dir), "final", quiet=True)
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


@pytest.mark.slow  # converts the tiny run's final model to fp16, int8 and bf16, and times them (~15 s)
def test_bench_precisions_on_the_cpu(tiny_run, tmp_path):
    """Each precision's top-1 and ONNX Runtime CPU latency next to fp32; the GPU rows skipped with their reason."""
    from lotus_deploy.export.precision import missing_packages

    if missing_packages():
        pytest.skip(f"needs the `precision` extra ({', '.join(missing_packages())} missing)")
    names = ["onnxruntime_cpu", "onnxruntime_cpu_fp16", "onnxruntime_cpu_int8", "onnxruntime_cpu_bf16", "tensorrt_int8"]
    cfg = BenchConfig(variants=["final"], backends=names, batch_sizes=[1, 4], warmup=1, iters=3, rounds=2, threads=1, pipeline=False)
    logs: list[str] = []
    run_bench(Run(tiny_run), cfg, tmp_path, log=logs.append)
    res = load_results(tmp_path)
    st = {b.name: b for b in res.backends}
    assert [st[n].status for n in names[:3]] == ["measured"] * 3
    assert st["onnxruntime_cpu_int8"].precision == "int8" and st["onnxruntime_cpu_int8"].family == "onnxruntime_cpu"
    assert st["onnxruntime_cpu_int8"].info["conversion"]["graph"]["precision"] == "int8"
    assert st["onnxruntime_cpu_int8"].info["conversion"]["calibration_images"] == 128  # export.calibration_images
    assert st["onnxruntime_cpu_bf16"].status == "failed" and "NOT_IMPLEMENTED" in st["onnxruntime_cpu_bf16"].reason  # no bf16 CPU kernels
    assert st["tensorrt_int8"].status == "skipped" or torch.cuda.is_available()
    assert (tmp_path / "onnx" / "final.fp16.onnx").is_file() and (tmp_path / "onnx" / "final.int8.onnx").is_file()
    acc = {a.backend: a for a in res.accuracy}
    assert acc["onnxruntime_cpu_fp16"].agreement >= 0.99 and acc["onnxruntime_cpu_int8"].agreement >= 0.9
    assert {(r.backend, r.batch) for r in res.rows} == {(n, b) for n in names[:3] for b in (1, 4)}
    assert "cpu_int8" in res.environment and set(res.environment["cpu_int8"]) == {"vnni", "amx"}
    md = (tmp_path / "report.md").read_text()
    assert "## Precisions" in md and "### onnxruntime_cpu" in md and "- CPU int8 instructions: VNNI " in md
    assert "| final | int8 | onnxruntime_cpu_int8 |" in md and "x) |" in md
    assert "- `tensorrt_int8` (int8) not measured: " in md
    assert any("final.int8.onnx: int8 ONNX" in m for m in logs)
