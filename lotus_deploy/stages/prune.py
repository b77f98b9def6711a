"""``magnitude_prune``: one-shot pruning to a target sparsity over a scope, by ``criterion``.

The kind keeps its historical name; ``criterion`` (:data:`lotus_deploy.prune.criteria.CRITERIA`)
picks magnitude (default), wanda or sparsegpt. wanda and sparsegpt calibrate on
``calibration_images`` train images first (one forward pass with hooks on the Linears in scope);
sparsegpt also rewrites the weights it keeps (its reconstruction), masks in force staying zero.
"""

from __future__ import annotations

from lotus_deploy.prune.criteria import apply_pruned_, prune_model
from lotus_deploy.recipe.stages import MagnitudePrune
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import calibration, mask_report, resolve_sparsity


@register_stage(MagnitudePrune)
def magnitude_prune(cfg: MagnitudePrune, state):
    import time

    from lotus_deploy.scope import select_weights
    from lotus_deploy.state import StageResult

    sparsity, provenance = resolve_sparsity(cfg.sparsity, state, cfg.scope)
    t0 = time.perf_counter()
    stats = calibration(state, [cfg.criterion], list(select_weights(state.model, cfg.scope)), cfg.calibration_images)
    pruned = prune_model(state.model, cfg.scope, sparsity, cfg.granularity, state.masks, cfg.criterion, stats)
    prune_s = time.perf_counter() - t0
    state.masks = {**state.masks, **pruned.masks}
    apply_pruned_(state.model, pruned, state.masks)
    ev = state.evaluate(desc=f"{state.stage_name} eval")
    state.log.info(f"{state.stage_name}: sparsity {sparsity:.3f} ({cfg.criterion}, {cfg.granularity}) in {prune_s:.1f} s -> top1 {ev['top1']:.2f}%")
    return StageResult(metrics={
        "top1": ev["top1"], "top5": ev["top5"], **provenance, "criterion": cfg.criterion, "prune_s": prune_s,
        "calibration_images": stats.images if stats else 0, "reconstructed_layers": len(pruned.weights), **mask_report(state, cfg.scope),
    })
