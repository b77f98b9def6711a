"""Synthetic bench results for the tests of tests/bench (a helper module, not a test file)."""

from __future__ import annotations

from lotus_deploy.bench.pareto import mark_pareto
from lotus_deploy.bench.results import BenchResults

PNG = b"\x89PNG\r\n\x1a\n"


def row(variant, backend, batch, ms, top1, sparsity=0.0):
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
        row(v, b, bs, scale * ms * f * bs ** 0.5, top1 if accuracy else None, sp)
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
        "environment": {"cpu": "test cpu", "cpu_count": 2, "torch": "2.0-test"},
        "backends": [
            {"name": "torch_cpu", "description": "", "device": "cpu", "status": "measured"},
            {"name": "onnxruntime_cpu", "description": "", "device": "cpu", "status": "measured"},
            {"name": "tensorrt", "description": "", "device": "cuda", "status": "skipped", "reason": "no GPU here"},
        ],
        "variants": facts, "accuracy": acc, "rows": rows,
        "pipeline": {"variant": "dense", "device": "cpu", "batch_size": 8, "images": 100, "cache_eval": True,
                     "loop_images_per_s": 90.0, "forward_images_per_s": 100.0, "efficiency": 0.9, "sweeps": []},
    })
