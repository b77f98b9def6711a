"""``semi_structured``: 2:4 masks on the eligible Linears in scope (NVIDIA sparse tensor cores).

In every group of 4 consecutive weights along ``in_features`` (the reduction axis K), the 2
largest |w| among the weights an earlier mask kept survive. Ineligible layers (shape or dtype
outside the sparse-kernel constraints, or not a Linear) are skipped and listed with the reason.
An optional input-channel permutation (:mod:`lotus_deploy.permute`) first raises the magnitude
2:4 keeps without changing the network's function. Follow with a fine-tune (masks enforced)
and ``bake``; export then checks that every layer listed here is still 2:4 in the ONNX graph.
"""

from __future__ import annotations

from lotus_deploy.recipe.stages import SemiStructured
from lotus_deploy.registry import register_stage


def semi_structured_masks(model, scope, existing=None) -> tuple[dict, dict[str, str]]:
    """Pure: 2:4 masks for the eligible Linear weights in scope (model untouched).

    Args:
        scope: scope patterns (see :mod:`lotus_deploy.scope`).
        existing: masks in force; each 2:4 mask is chosen among the weights they keep and is a
            subset of them.

    Returns:
        (weight name -> 2:4 boolean mask, weight name -> why it was skipped).

    Raises:
        ValueError: the scope selects nothing.
    """
    from lotus_deploy.prune.two_four import eligible, two_four_masks
    from lotus_deploy.scope import select_weights

    selected = select_weights(model, scope)
    if not selected:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    modules = dict(model.named_modules())
    existing = existing or {}
    masks, skipped = {}, {}
    for name, w in selected.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = modules.get(mod_name)
        reason = f"{leaf} is not a layer weight" if leaf != "weight" or mod is None else eligible(mod)
        if reason:
            skipped[name] = reason
            continue
        masks[name] = two_four_masks(w, existing.get(name))
    return masks, skipped


def layer_table(model, masks, kept_dense: dict[str, float]) -> dict[str, dict]:
    """Per 2:4 layer: shape, sparsity of its mask and the fraction of |w| it keeps."""
    from lotus_deploy.prune.two_four import is_small, kept_magnitude

    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = {}
    for name, m in masks.items():
        out[name] = {
            "shape": list(m.shape),
            "sparsity": 1.0 - float(m.float().mean()),
            "kept_magnitude": kept_magnitude(params[name], m),
            "kept_magnitude_before_permute": kept_dense.get(name),
            "small": is_small(modules[name.rpartition(".")[0]]),
        }
    return out


@register_stage(SemiStructured)
def semi_structured(cfg: SemiStructured, state):
    import torch

    from lotus_deploy.files import write_json
    from lotus_deploy.masks import apply_masks_, weight_stats
    from lotus_deploy.prune.two_four import SMALL_CHANNELS, is_two_four
    from lotus_deploy.stages.prune import mask_report
    from lotus_deploy.state import StageResult

    metrics: dict = {}
    artifacts = {}
    if cfg.permute:
        from lotus_deploy.prune.permute import permute_for_two_four_

        targets, _ = semi_structured_masks(state.model, cfg.scope, state.masks)
        out = permute_for_two_four_(state.model, list(targets), state.masks, cfg.permute_seconds, seed=state.seed())
        state.masks = out.masks
        metrics["permutation"] = {"layers": out.layers, "skipped": out.skipped}
        if out.perms:
            artifacts["permutations"] = write_json(state.stage_dir / "permutations.json", out.perms)
        for name, r in out.layers.items():
            state.log.info(f"{state.stage_name}: permute {name}: 2:4 keeps {100 * r['kept_before']:.2f}% -> {100 * r['kept_after']:.2f}% of |w| ({r['seconds']:.2f} s{'' if r['converged'] else ', budget hit'})")
    new, skipped = semi_structured_masks(state.model, cfg.scope, state.masks)
    params = dict(state.model.named_parameters())
    before = {n: r["kept_before"] for n, r in metrics.get("permutation", {}).get("layers", {}).items()}
    layers = layer_table(state.model, new, before)  # before applying: kept |w| needs the dropped weights
    with torch.no_grad():  # fraction of |w| over all 2:4 layers that their masks keep
        kept_abs = sum(float((params[n].abs().double() * m).sum()) for n, m in new.items())
        total_abs = sum(float(params[n].abs().double().sum()) for n in new)
    mean_kept = kept_abs / total_abs if total_abs else 1.0
    state.masks = {**state.masks, **new}
    apply_masks_(state.model, state.masks)
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
        top1=ev["top1"], top5=ev["top5"], **mask_report(state, cfg.scope),
        two_four_layers=sorted(new), two_four_sparsity=stats["sparsity"], kept_magnitude=mean_kept,
        skipped=skipped, small_layers=small, layers=layers,
    )
    return StageResult(metrics=metrics, artifacts=artifacts)
