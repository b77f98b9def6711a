"""``bench``: accuracy and latency of the run's variants on the registered backends."""

from __future__ import annotations

from typing import Literal

from ..config import StageConfig
from ..registry import register_stage


class Bench(StageConfig):
    """Uses the recipe's ``bench`` section (variants, backends, batch sizes, timing)."""

    kind: Literal["bench"] = "bench"


@register_stage(Bench)
def bench(cfg: Bench, state):
    from ..bench import run_bench
    from ..pipeline import Run
    from ..state import StageResult

    out = state.run_dir / "bench"
    report = run_bench(Run(state.run_dir), state.recipe.bench, out, log=state.log.info, data=state.data)
    rows = [{k: r[k] for k in ("variant", "backend", "batch", "top1", "latency_median_ms", "images_per_s")} for r in report["rows"]]
    return StageResult(
        metrics={"rows": rows, "skipped": report["skipped"]},
        artifacts={"report_json": out / "report.json", "report_md": out / "report.md"},
        model_changed=False,
    )
