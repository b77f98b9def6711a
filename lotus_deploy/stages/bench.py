"""``bench``: accuracy and latency of the run's variants on the registered backends."""

from __future__ import annotations

from lotus_deploy.recipe.stages import Bench
from lotus_deploy.registry import register_stage


@register_stage(Bench)
def bench(cfg: Bench, state):
    from lotus_deploy.bench.run import run_bench
    from lotus_deploy.run import Run
    from lotus_deploy.state import StageResult

    out = state.run_dir / "bench"
    # The manifest on disk is the live one: it holds every stage finished before this one.
    results = run_bench(Run(state.run_dir), state.recipe.bench, out, log=state.log.info, data=state.data)
    keys = ("variant", "backend", "batch", "top1", "latency_median_ms", "images_per_s", "pareto")
    files = {
        "results_json": "results.json", "results_csv": "results.csv", "report_md": "report.md",
        "pareto_png": "pareto.png", "sparsity_png": "sparsity.png",
    }
    return StageResult(
        metrics={
            "rows": [{k: r[k] for k in keys} for r in results["rows"]],
            "skipped": [{"backend": b["name"], "reason": b["reason"]} for b in results["backends"] if b["status"] != "measured"],
            "pipeline_efficiency": results["pipeline"]["efficiency"] if results["pipeline"] else None,
        },
        artifacts={k: out / f for k, f in files.items() if (out / f).is_file()},
        model_changed=False,
    )
