"""``semi_structured``: 2:4 masks on the eligible Linears in scope (NVIDIA sparse tensor cores).

In every group of 4 consecutive weights along ``in_features`` (the reduction axis K), the 2
largest |w| among the weights an earlier mask kept survive (``earlier_mask: within``), or the 2
largest among all of the layer's weights (``revive``: the earlier mask's zeros lose first, and a
group with fewer than 2 survivors brings zeros back, which then train). Ineligible layers (shape or dtype
outside the sparse-kernel constraints, or not a Linear) are skipped and listed with the reason.
An optional input-channel permutation (:mod:`lotus_deploy.prune.permute`) first raises the magnitude
2:4 keeps without changing the network's function. ``criterion`` picks the 2 of 4 after it
(:mod:`lotus_deploy.prune.criteria`): magnitude, wanda or sparsegpt (2:4 OBS that also rewrites the
kept weights), the last two calibrated on ``calibration_images`` train images of the (permuted) model. Follow with a fine-tune (masks enforced)
and ``bake``; export then checks that every layer listed here is still 2:4 in the ONNX graph.
"""

from __future__ import annotations

from lotus_deploy.prune.criteria import apply_pruned_
from lotus_deploy.prune.semi_structured import (
    eligible_weights,
    kept_fraction,
    layer_table,
    semi_structured_prune,
)
from lotus_deploy.recipe.stages import SemiStructured
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import calibration, mask_report


@register_stage(SemiStructured)
def semi_structured(cfg: SemiStructured, state):
    from lotus_deploy.files import write_json
    from lotus_deploy.masks import weight_stats
    from lotus_deploy.prune.two_four import SMALL_CHANNELS, is_two_four
    from lotus_deploy.state import StageResult

    metrics: dict = {}
    artifacts = {}
    if cfg.permute:
        from lotus_deploy import distributed as dist
        from lotus_deploy.prune.permute import permute_for_two_four_

        targets, _ = eligible_weights(state.model, cfg.scope)
        seed, shared = state.seed(), dist.active()

        def search():
            o = permute_for_two_four_(state.model, list(targets), state.masks, cfg.permute_seconds, seed=seed)
            if shared:  # sent to the other ranks: pickled tensors travel on the CPU
                o.masks = {k: v.cpu() for k, v in o.masks.items()}
            return o

        # a time-budgeted search need not find the same order twice: rank 0 searches, every rank takes its result
        out = dist.main_computes(search, "the 2:4 permutation search")
        dist.broadcast_module_(state.model, what="the permuted weights")
        state.masks = {k: v.to(state.device) for k, v in out.masks.items()} if shared else out.masks
        metrics["permutation"] = {"layers": out.layers, "skipped": out.skipped}
        if out.perms:
            artifacts["permutations"] = write_json(state.stage_dir / "permutations.json", out.perms)
        for name, r in out.layers.items():
            state.log.info(f"{state.stage_name}: permute {name}: 2:4 keeps {100 * r['kept_before']:.2f}% -> {100 * r['kept_after']:.2f}% of |w| ({r['seconds']:.2f} s{'' if r['converged'] else ', budget hit'})")
    stats = calibration(state, [cfg.criterion], list(eligible_weights(state.model, cfg.scope)[0]), cfg.calibration_images)
    within = state.masks if cfg.earlier_mask == "within" else None  # revive: the earlier mask's zeros may come back
    pruned, skipped = semi_structured_prune(state.model, cfg.scope, within, cfg.criterion, stats)
    new = pruned.masks
    params = dict(state.model.named_parameters())
    before = {n: r["kept_before"] for n, r in metrics.get("permutation", {}).get("layers", {}).items()}
    layers = layer_table(state.model, new, before)  # before applying: kept |w| needs the dropped weights
    mean_kept = kept_fraction(state.model, new)
    state.masks = {**state.masks, **new}
    apply_pruned_(state.model, pruned, state.masks)
    bad = [n for n in new if not is_two_four(params[n], 1)]
    if bad:  # cannot happen unless two_four_masks is wrong; never hand on a silently broken pattern
        raise RuntimeError(f"2:4 masks applied but weights are not 2:4: {bad}")
    small = [n for n, r in layers.items() if r["small"]]
    for name, why in skipped.items():
        state.log.warning(f"{state.stage_name}: skipped {name}: {why}")
    if not new:
        state.log.warning(f"{state.stage_name}: no eligible layer in scope {cfg.scope}: nothing is 2:4")
    if small:
        state.log.warning(
            f"{state.stage_name}: {len(small)} of {len(new)} 2:4 layers have < {SMALL_CHANNELS} channels; sparse kernels rarely beat dense ones there"
        )
    ev = state.evaluate(desc=f"{state.stage_name} eval")
    stats = weight_stats(state.model, list(new)) if new else {"sparsity": 0.0}
    state.log.info(
        f"{state.stage_name}: {len(new)} layers 2:4 (sparsity {100 * stats['sparsity']:.1f}% in them, {100 * mean_kept:.1f}% of |w| kept), "
        f"{len(skipped)} skipped -> top1 {ev['top1']:.2f}%"
    )
    metrics.update(
        top1=ev["top1"], top5=ev["top5"], criterion=cfg.criterion, earlier_mask=cfg.earlier_mask, **mask_report(state, cfg.scope),
        two_four_layers=sorted(new), two_four_sparsity=stats["sparsity"], kept_magnitude=mean_kept,
        skipped=skipped, small_layers=small, layers=layers,
    )
    return StageResult(metrics=metrics, artifacts=artifacts)
