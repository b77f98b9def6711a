"""``finetune``: train the head or the whole model; masks in the state stay enforced."""

from __future__ import annotations

from lotus_deploy.recipe.stages import Finetune
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import (
    early_bird_watch,
    finish_early_bird,
    run_training,
    train_settings,
    write_history,
)


@register_stage(Finetune)
def finetune(cfg: Finetune, state):
    from lotus_deploy.state import StageResult

    cfg = train_settings(cfg, state)
    watch = early_bird_watch(cfg, state) if cfg.early_bird is not None else None
    metrics: dict = {}
    history, final = run_training(cfg, state, metrics=metrics, **(watch.hooks() if watch else {}))
    metrics.update(top1=final["top1"], top5=final["top5"], eval_loss=final["loss"], history=history)
    artifacts = {"history": write_history(state, history)}
    if watch is not None:
        finish_early_bird(watch, state, history, metrics, artifacts)
    return StageResult(metrics=metrics, artifacts=artifacts)
