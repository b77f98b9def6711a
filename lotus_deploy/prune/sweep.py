"""Essential sparsity: a one-shot sweep that never compounds, and its knees.

The sweep prunes the *current* weights to one sparsity with a criterion (magnitude by default,
see :mod:`lotus_deploy.prune.criteria`), evaluates and restores them, point after point, from one
copy of the in-scope weights and one ranking of them (sparsegpt reconstructs at every point). Two knees summarize the
accuracy curve (sparsity as a fraction of the weights in scope, top-1 in %):

* ``knee``: the largest sparsity within ``tolerance`` accuracy points of dense
  (:func:`tolerance_knee`);
* ``knee_curvature``: Kneedle's point of largest bend (:func:`kneedle`).

These are the words a stage's ``sparsity`` field may use instead of a number
(:data:`lotus_deploy.recipe.base.KneeWord`). torch is imported inside the functions.
"""

from __future__ import annotations

from typing import Literal, Sequence

# ----------------------------------------------------------------------------- knees (pure)


def tolerance_knee(xs: Sequence[float], ys: Sequence[float], dense: float, tolerance: float) -> int | None:
    """Index of the largest ``x`` whose ``y`` is within ``tolerance`` of ``dense``.

    Args:
        xs: sparsities (any order).
        ys: top-1 accuracies (%) at ``xs``.
        dense: dense top-1 (%).
        tolerance: allowed drop in accuracy points.

    Returns:
        The index into ``xs``, or None when no point qualifies. Points past a failing one still
        count (the rule is "largest sparsity within tolerance", not "last before the first drop").
    """
    ok = [i for i, y in enumerate(ys) if dense - y <= tolerance + 1e-9]
    return max(ok, key=lambda i: xs[i]) if ok else None


def kneedle(
    xs: Sequence[float],
    ys: Sequence[float],
    curve: Literal["concave", "convex"] = "concave",
) -> int | None:
    """Kneedle knee (Satopaa et al., 2011): the point farthest from the chord of the normalized curve.

    Both axes are scaled to [0, 1]; the difference curve is the height of each point above the
    straight line joining the first and last points (``concave``: an accuracy curve that stays
    flat, then falls) or below it (``convex``). The knee is its maximum.

    Returns:
        Index into ``xs`` of the knee, or None for fewer than 3 points or no bend of that kind
        (a straight or opposite-curvature curve).
    """
    pts = sorted(zip(xs, ys, range(len(xs))))
    if len(pts) < 3:
        return None
    x = [p[0] for p in pts]
    y = [p[1] for p in pts]
    xr, yr = (x[-1] - x[0]) or 1.0, (max(y) - min(y)) or 1.0
    xn = [(v - x[0]) / xr for v in x]
    yn = [(v - min(y)) / yr for v in y]
    chord = [yn[0] + (yn[-1] - yn[0]) * t for t in xn]
    diff = [a - c for a, c in zip(yn, chord)] if curve == "concave" else [c - a for a, c in zip(yn, chord)]
    j = max(range(len(diff)), key=lambda i: diff[i])
    return pts[j][2] if diff[j] > 1e-9 else None


def knees(xs: Sequence[float], ys: Sequence[float], dense: float, tolerance: float) -> dict[str, float | None]:
    """Both knees of one curve, keyed by their knee words.

    Args:
        xs: sparsities (fractions); ys: top-1 (%) at each; dense: dense top-1 (%);
        tolerance: allowed drop at ``knee`` (accuracy points).

    Returns:
        ``knee``, ``knee_top1``, ``knee_curvature``, ``knee_curvature_top1`` (None where a knee
        was not found).
    """
    out: dict[str, float | None] = {}
    for word, i in (("knee", tolerance_knee(xs, ys, dense, tolerance)), ("knee_curvature", kneedle(xs, ys))):
        out[word] = xs[i] if i is not None else None
        out[f"{word}_top1"] = ys[i] if i is not None else None
    return out


# ----------------------------------------------------------------------------- sweep


def sweep(
    model,
    scope: Sequence[str],
    sparsities: Sequence[float],
    evaluate_fn,
    granularity: str = "global",
    existing=None,
    criterion: str = "magnitude",
    stats=None,
) -> list[dict]:
    """Prune ``model`` to each sparsity from the same weights, evaluate, restore.

    Only one copy of the in-scope weights is held (plus one ranking of them, see
    :meth:`lotus_deploy.prune.criteria.Criterion.masks_at`); reconstructed weights (sparsegpt)
    are copied in, masks applied in place with ``mul_`` and the weights copied back after each
    point, so the model ends bit-identical to how it started (also when ``evaluate_fn`` raises).
    Each point's masks equal a fresh one-shot prune with the criterion (``magnitude_masks`` for
    ``magnitude``).

    Args:
        scope: scope patterns; weights outside it are never touched.
        sparsities: target sparsities (fractions).
        evaluate_fn: ``() -> dict`` with at least ``top1`` and ``seconds``.
        existing: masks already in force; they stay in force (a point below their sparsity
            measures them alone).
        criterion: a name in :data:`lotus_deploy.prune.criteria.CRITERIA`.
        stats: calibration statistics of the scope's Linears (wanda, sparsegpt).

    Returns:
        One row per point: ``target``, ``sparsity`` (measured zeros in scope during the
        evaluation), ``masks_hash``, ``prune_s`` (seconds choosing the point's masks) and the
        evaluation's metrics.
    """
    import time

    import torch

    from lotus_deploy.masks import masks_hash, weight_stats
    from lotus_deploy.prune.criteria import CRITERIA
    from lotus_deploy.scope import select_weights

    params = select_weights(model, scope)
    if not params:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    existing = {k: v for k, v in (existing or {}).items() if k in params}
    dense = {k: p.detach().clone() for k, p in params.items()}  # the one copy
    masks_at = CRITERIA[criterion].masks_at(dense, granularity, existing, stats)  # one sort for every point
    rows = []
    try:
        for s in sparsities:
            t0 = time.perf_counter()
            pruned = masks_at(s)
            prune_s = time.perf_counter() - t0
            masks = {k: m & existing[k].to(m.device) if k in existing else m for k, m in pruned.masks.items()}
            with torch.no_grad():
                for k, p in params.items():
                    if k in pruned.weights:
                        p.copy_(pruned.weights[k])
                    p.mul_(masks[k].to(device=p.device, dtype=p.dtype))
            measured = weight_stats(model, list(params))["sparsity"]
            ev = evaluate_fn()
            rows.append({"target": float(s), "sparsity": measured, "masks_hash": masks_hash(masks), "prune_s": prune_s, **ev})
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(dense[k])
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(dense[k])
    return rows
