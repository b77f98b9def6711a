"""``bench``: accuracy and latency of the run's variants on the registered backends."""

from __future__ import annotations

from typing import Literal

from ..config import StageConfig
from ..registry import register_stage


class Bench(StageConfig):
    """Uses the recipe's ``bench`` section (variants, backends, batch sizes, timing).

    Writes ``bench/results.json``, ``results.csv``, ``report.md``, ``pareto.png`` and
    ``sparsity.png`` in the run directory (see :mod:`lotus_deploy.bench`).
    """

    kind: Literal["bench"] = "bench"


@register_stage(Bench)
def bench(cfg: Bench, state):
    from ..bench import run_bench
    from ..pipeline import Run
    from ..state import StageResult

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
