"""``bake``: write the zeros into the weights and drop the masks."""

from __future__ import annotations

from lotus_deploy.recipe.stages import Bake
from lotus_deploy.registry import register_stage


@register_stage(Bake)
def bake(cfg: Bake, state):
    from lotus_deploy.masks import apply_masks_, mask_sparsity, masks_hash
    from lotus_deploy.state import StageResult

    baked = {"baked_masks_hash": masks_hash(state.masks), "baked_mask_sparsity": mask_sparsity(state.masks)}
    apply_masks_(state.model, state.masks)
    state.masks = {}
    return StageResult(metrics=baked)
