"""``evaluate``: accuracy on the eval split plus sparsity and size facts."""

from __future__ import annotations

from lotus_deploy.recipe.stages import Evaluate
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import mask_report


@register_stage(Evaluate)
def evaluate(cfg: Evaluate, state):
    from lotus_deploy.state import StageResult

    ev = state.evaluate(desc=state.stage_name)
    facts = mask_report(state, cfg.scope)
    state.log.info(
        f"{state.stage_name}: top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}% "
        f"scope sparsity {facts['scope_sparsity']:.4f} on {ev['images']} images"
    )
    return StageResult(metrics={**ev, **facts}, model_changed=False)
