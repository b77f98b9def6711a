"""``bake``: write the zeros into the weights and drop the masks."""

from __future__ import annotations

from typing import ClassVar, Literal

from ..config import StageConfig
from ..registry import register_stage


class Bake(StageConfig):
    """After bake the checkpoint is a plain timm state dict with zeros in it."""

    needs_masks: ClassVar[bool] = True
    ends_masks: ClassVar[bool] = True

    kind: Literal["bake"] = "bake"


@register_stage(Bake)
def bake(cfg: Bake, state):
    from ..masks import apply_masks_, mask_sparsity, masks_hash
    from ..state import StageResult

    baked = {"baked_masks_hash": masks_hash(state.masks), "baked_mask_sparsity": mask_sparsity(state.masks)}
    apply_masks_(state.model, state.masks)
    state.masks = {}
    return StageResult(metrics=baked)
