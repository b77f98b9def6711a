"""``evaluate``: accuracy on the eval split plus sparsity and size facts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Scope, StageConfig
from ..registry import register_stage
from ..scope import DEFAULT_SCOPE


class Evaluate(StageConfig):
    kind: Literal["evaluate"] = "evaluate"
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="scope whose sparsity is reported")


@register_stage(Evaluate)
def evaluate(cfg: Evaluate, state):
    from ..state import StageResult
    from .prune import mask_report

    ev = state.evaluate(desc=state.stage_name)
    facts = mask_report(state, cfg.scope)
    state.log.info(
        f"{state.stage_name}: top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}% "
        f"scope sparsity {facts['scope_sparsity']:.4f} on {ev['images']} images"
    )
    return StageResult(metrics={**ev, **facts}, model_changed=False)
