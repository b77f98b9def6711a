"""2:4 masks for a model's eligible Linears in scope, and a per-layer report (pure).

In every group of 4 consecutive weights along ``in_features`` (the reduction axis K), 2 of the
weights an earlier mask kept survive: the 2 largest |w| (:func:`lotus_deploy.prune.two_four.two_four_masks`),
or as another criterion chooses (:mod:`lotus_deploy.prune.criteria`).
Ineligible layers (shape or dtype outside the sparse-kernel constraints, or not a Linear) are
skipped with the reason. torch is imported inside the functions.
"""

from __future__ import annotations


def semi_structured_masks(model, scope, existing=None) -> tuple[dict, dict[str, str]]:
    """Magnitude 2:4 masks for the eligible Linear weights in scope (model untouched).

    Args:
        scope: scope patterns (see :mod:`lotus_deploy.scope`).
        existing: masks in force; each 2:4 mask is chosen among the weights they keep and is a
            subset of them.

    Returns:
        (weight name -> 2:4 boolean mask, weight name -> why it was skipped).

    Raises:
        ValueError: the scope selects nothing.
    """
    pruned, skipped = semi_structured_prune(model, scope, existing)
    return pruned.masks, skipped


def semi_structured_prune(model, scope, existing=None, criterion: str = "magnitude", stats=None):
    """2:4 masks (and sparsegpt's reconstructed weights) for the eligible Linear weights in scope.

    Args:
        scope: scope patterns (see :mod:`lotus_deploy.scope`).
        existing: masks in force; each 2:4 mask is a subset of its mask.
        criterion: a name in :data:`lotus_deploy.prune.criteria.CRITERIA` (magnitude: the 2
            largest |w| of each group of 4 along K; wanda: the 2 largest |w| x input norm;
            sparsegpt: 2:4 OBS with reconstruction).
        stats: calibration statistics of the eligible layers (wanda, sparsegpt).

    Returns:
        (:class:`lotus_deploy.prune.criteria.Pruned`, weight name -> why it was skipped); the
        model is untouched.

    Raises:
        ValueError: the scope selects nothing.
    """
    from lotus_deploy.prune.criteria import CRITERIA

    weights, skipped = eligible_weights(model, scope)
    existing = {k: v for k, v in (existing or {}).items() if k in weights}
    return CRITERIA[criterion].two_four(weights, existing, stats), skipped


def eligible_weights(model, scope) -> tuple[dict, dict[str, str]]:
    """(weight name -> weight of each Linear in scope that sparse kernels accept, name -> why skipped).

    Raises:
        ValueError: the scope selects nothing.
    """
    from lotus_deploy.prune.two_four import eligible
    from lotus_deploy.scope import select_weights

    selected = select_weights(model, scope)
    if not selected:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    modules = dict(model.named_modules())
    weights, skipped = {}, {}
    for name, w in selected.items():
        mod_name, _, leaf = name.rpartition(".")
        mod = modules.get(mod_name)
        reason = f"{leaf} is not a layer weight" if leaf != "weight" or mod is None else eligible(mod)
        if reason:
            skipped[name] = reason
        else:
            weights[name] = w.detach()
    return weights, skipped


def layer_table(model, masks, kept_dense: dict[str, float]) -> dict[str, dict]:
    """Per 2:4 layer: shape, sparsity of its mask (fraction) and the fraction of |w| it keeps.

    Args:
        masks: the 2:4 masks (not yet applied: the kept fraction needs the dropped weights).
        kept_dense: weight name -> fraction of |w| 2:4 kept before a permutation, if any.
    """
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


def kept_fraction(model, masks) -> float:
    """Fraction of |w| over all masked layers that their masks keep, in [0, 1] (1.0 without any)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        kept = sum(float((params[n].abs().double() * m).sum()) for n, m in masks.items())
        total = sum(float(params[n].abs().double().sum()) for n in masks)
    return kept / total if total else 1.0
