"""``magnitude_prune``: one-shot L1 magnitude pruning to a target sparsity over a scope."""

from __future__ import annotations

from lotus_deploy.recipe.stages import MagnitudePrune
from lotus_deploy.registry import register_stage


def prune_masks(model, scope, sparsity: float, granularity: str, existing=None):
    """Pure: the masks a one-shot magnitude prune of ``model`` would apply (model untouched).

    Weights already masked in ``existing`` stay masked and count toward the target.
    """
    from lotus_deploy.scope import select_weights

    weights = select_weights(model, scope)
    if not weights:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    from lotus_deploy.masks import magnitude_masks

    existing = {k: v for k, v in (existing or {}).items() if k in weights}
    return magnitude_masks(weights, sparsity, granularity, existing or None)


def mask_report(state, scope) -> dict:
    """Sparsity of the scope and of the whole model, parameter and non-zero counts."""
    from lotus_deploy.masks import mask_sparsity, masks_hash, weight_stats
    from lotus_deploy.scope import select_weights

    in_scope = list(select_weights(state.model, scope))
    s = weight_stats(state.model, in_scope)
    whole = weight_stats(state.model)
    return {
        "scope_sparsity": s["sparsity"],
        "scope_params": s["params"],
        "model_sparsity": whole["sparsity"],
        "params": whole["params"],
        "nonzeros": whole["nonzeros"],
        "mask_sparsity": mask_sparsity(state.masks),
        "masks_hash": masks_hash(state.masks) if state.masks else None,
    }


@register_stage(MagnitudePrune)
def magnitude_prune(cfg: MagnitudePrune, state):
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.stages.sparsity import resolve_sparsity
    from lotus_deploy.state import StageResult

    sparsity, provenance = resolve_sparsity(cfg.sparsity, state, cfg.scope)
    new = prune_masks(state.model, cfg.scope, sparsity, cfg.granularity, state.masks)
    state.masks = {**state.masks, **new}
    apply_masks_(state.model, state.masks)
    ev = state.evaluate(desc=f"{state.stage_name} eval")
    state.log.info(f"{state.stage_name}: sparsity {sparsity:.3f} ({cfg.granularity}) -> top1 {ev['top1']:.2f}%")
    return StageResult(metrics={"top1": ev["top1"], "top5": ev["top5"], **provenance, **mask_report(state, cfg.scope)})
