"""``finetune``: train the head or the whole model; masks in the state stay enforced."""

from __future__ import annotations

import math

from lotus_deploy.recipe.stages import Finetune
from lotus_deploy.registry import register_stage


def run_training(cfg: Finetune, state, forward=None, make_loader=None, steps_per_epoch=None, **hooks):
    """Train ``state.model`` per ``cfg`` with the state's masks; shared by training stages.

    Returns:
        (history, final eval metrics).
    """
    from lotus_deploy.train import train

    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    seed = state.seed()
    if make_loader is None:
        def make_loader(epoch: int):
            return data.train_loader(seed=seed + 1 + epoch, batch_size=bs)

        steps_per_epoch = math.ceil(len(data.train) / bs)
    history = train(
        state.model, cfg.train_spec(), make_loader, steps_per_epoch, state.device, masks=state.masks,
        evaluate_fn=lambda: state.evaluate(desc=f"{state.stage_name} eval"), forward=forward,
        log=state.log.info, desc=state.stage_name, **hooks,
    )
    final = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval_")} if history else {}
    if not final:
        final = state.evaluate()
    return history, final


def write_history(state, history: list[dict]):
    """history.csv of per-epoch metrics in the stage directory."""
    from lotus_deploy.files import write_csv

    return write_csv(state.stage_dir / "history.csv", history)


@register_stage(Finetune)
def finetune(cfg: Finetune, state):
    from lotus_deploy.state import StageResult

    watch = _early_bird_watch(cfg, state) if cfg.early_bird is not None else None
    history, final = run_training(cfg, state, **(watch.hooks() if watch else {}))
    path = write_history(state, history)
    metrics = {"top1": final["top1"], "top5": final["top5"], "eval_loss": final["loss"], "history": history}
    artifacts = {"history": path}
    if watch is not None:
        metrics["early_bird"], eb_arts = watch.finish(state.stage_dir)
        metrics["early_bird"].update(steps_trained=history[-1]["step"] if history else 0, **watch.provenance)
        artifacts.update(eb_arts)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _early_bird_watch(cfg: Finetune, state):
    """The early-bird hooks for this stage (sparsity words resolved from the sweep)."""
    from lotus_deploy.prune.early_bird import EarlyBirdDetector, EarlyBirdWatch
    from lotus_deploy.stages.sparsity import resolve_sparsity

    eb = cfg.early_bird
    sparsity, provenance = resolve_sparsity(eb.sparsity, state, eb.scope)
    bs = cfg.batch_size or state.data.cfg.batch_size
    watch = EarlyBirdWatch(
        state.model, eb.scope, sparsity, EarlyBirdDetector(eb.window, eb.threshold), every=eb.every, stop=eb.stop,
        steps_per_epoch=math.ceil(len(state.data.train) / bs), existing=state.masks, log=state.log.info,
    )
    watch.provenance = provenance
    return watch
