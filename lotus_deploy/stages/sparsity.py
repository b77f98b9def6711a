"""``essential_sparsity``: sweep one-shot magnitude pruning from the same dense weights, find the knee.

The sweep is a measurement: each point prunes the *current* weights to one sparsity, evaluates,
and restores them, so points never compound. Only one copy of the in-scope weights is kept
(no per-point model copies). The knee is recorded in the manifest; later stages say
``sparsity: knee`` (tolerance knee) or ``sparsity: knee_curvature`` (Kneedle knee) to use it,
resolved by :func:`resolve_sparsity`.
"""

from __future__ import annotations

from typing import Literal, Sequence

from lotus_deploy.recipe.base import KNEE_VALUES
from lotus_deploy.recipe.stages import EssentialSparsity
from lotus_deploy.registry import register_stage

DEFAULT_SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(11))  # 0, 0.05, ..., 0.5
PRIMARY = "scope"  # curve name of the `scope` field (the extra `scopes` are named by the user)




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


# ----------------------------------------------------------------------------- sweep


def ranked_masks(weights, granularity: str = "global", existing=None):
    """``s -> masks`` equal to ``magnitude_masks(weights, s, granularity, existing)``, ranking once.

    The weights are scored and stably sorted a single time (the expensive part: about 3 s for a
    ViT-S's 21 M block weights on 2 cores); each call then only marks the first
    ``round(s * n)`` positions of that order (never fewer than ``existing`` removes), so a sweep
    costs one sort instead of one per point.
    """
    import torch

    from lotus_deploy.masks import magnitude_scores, split_flat

    ranked = []
    for names, flat in magnitude_scores(weights, granularity, existing):
        ranked.append((names, torch.argsort(flat, stable=True), flat.numel(), int((flat < 0).sum())))
        del flat

    def masks_at(sparsity: float) -> dict:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        out = {}
        for names, order, numel, n_existing in ranked:
            n_zero = max(int(round(sparsity * numel)), n_existing)
            keep = torch.ones(numel, dtype=torch.bool, device=order.device)
            keep[order[:n_zero]] = False
            out.update(split_flat(keep, names, weights))
        return out

    return masks_at


def sweep(
    model,
    scope: Sequence[str],
    sparsities: Sequence[float],
    evaluate_fn,
    granularity: str = "global",
    existing=None,
) -> list[dict]:
    """Prune ``model`` to each sparsity from the same weights, evaluate, restore.

    Only one copy of the in-scope weights is held (plus one ranking of them, see
    :func:`ranked_masks`); masks are applied in place with ``mul_`` and the weights copied back
    after each point, so the model ends bit-identical to how it started (also when
    ``evaluate_fn`` raises). Each point's masks equal a fresh one-shot ``magnitude_masks``.

    Args:
        scope: scope patterns; weights outside it are never touched.
        sparsities: target sparsities (fractions).
        evaluate_fn: ``() -> dict`` with at least ``top1`` and ``seconds``.
        existing: masks already in force; they stay in force (a point below their sparsity
            measures them alone).

    Returns:
        One row per point: ``target``, ``sparsity`` (measured zeros in scope during the
        evaluation), ``masks_hash`` and the evaluation's metrics.
    """
    import torch

    from lotus_deploy.masks import masks_hash, weight_stats
    from lotus_deploy.scope import select_weights

    params = select_weights(model, scope)
    if not params:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    existing = {k: v for k, v in (existing or {}).items() if k in params}
    dense = {k: p.detach().clone() for k, p in params.items()}  # the one copy
    masks_at = ranked_masks(dense, granularity, existing)  # one sort for every point
    rows = []
    try:
        for s in sparsities:
            masks = masks_at(s)
            masks = {k: m & existing[k].to(m.device) if k in existing else m for k, m in masks.items()}
            with torch.no_grad():
                for k, p in params.items():
                    p.mul_(masks[k].to(device=p.device, dtype=p.dtype))
            measured = weight_stats(model, list(params))["sparsity"]
            ev = evaluate_fn()
            rows.append({"target": float(s), "sparsity": measured, "masks_hash": masks_hash(masks), **ev})
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(dense[k])
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(dense[k])
    return rows


def resolve_sparsity(value, state, scope: Sequence[str] | None = None) -> tuple[float, dict]:
    """A stage's sparsity field as a number: numbers pass, ``knee`` words come from the sweep.

    Args:
        value: a fraction, ``knee`` (tolerance knee) or ``knee_curvature`` (Kneedle knee).
        scope: the asking stage's scope; the sweep curve with the same patterns is used, else
            the sweep's primary ``scope`` curve (a warning is logged).

    Returns:
        (sparsity, provenance dict for the manifest; empty for plain numbers).

    Raises:
        ValueError: no finished essential_sparsity stage, or it found no curvature knee.
    """
    if not isinstance(value, str):
        return float(value), {}
    if value not in KNEE_VALUES:
        raise ValueError(f"unknown sparsity word {value!r}; allowed: {', '.join(KNEE_VALUES)}")
    m = state.stage_metrics("essential_sparsity")
    if not m or "curves" not in m:
        raise ValueError(f"sparsity: {value} needs a finished essential_sparsity stage before this one")
    curves = m["curves"]
    name = next((n for n, c in curves.items() if scope is not None and list(c["scope"]) == list(scope)), None)
    if name is None:
        name = PRIMARY
        if scope is not None:
            state.log.warning(
                f"sparsity: {value}: no sweep curve has scope {list(scope)}; using the sweep's "
                f"{PRIMARY} curve ({curves[PRIMARY]['scope']})"
            )
    key = "tolerance_knee" if value == "knee" else "curvature_knee"
    s = curves[name][key]
    if s is None:
        raise ValueError(f"sparsity: {value}: the sweep's {name!r} curve has no {key.replace('_', ' ')}; use a number or `knee`")
    return float(s), {"sparsity_from": value, "sweep_curve": name, "resolved_sparsity": float(s)}


def _write_csv(path, rows: list[dict]):
    from lotus_deploy.files import write_csv

    return write_csv(path, rows, ["curve", "target", "sparsity", "top1", "top5", "loss", "drop", "images", "seconds", "masks_hash"])

@register_stage(EssentialSparsity)
def essential_sparsity(cfg: EssentialSparsity, state):
    import statistics
    import time

    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.plots import plot_sweep
    from lotus_deploy.stages.prune import mask_report, prune_masks
    from lotus_deploy.state import StageResult

    data = state.data
    data.eval_dataset()  # decode/cache before timing: the sweep measures evaluations only
    scopes = {PRIMARY: list(cfg.scope), **{k: list(v) for k, v in cfg.scopes.items()}}
    points = [s for s in cfg.sparsities if s > 0]
    t0 = time.perf_counter()
    dense = state.evaluate(desc=f"{state.stage_name} dense")
    dense_row = {"target": 0.0, "sparsity": None, "masks_hash": None, **dense}
    table, curves, knees = [], {}, {}
    for name, patterns in scopes.items():
        rows = sweep(
            state.model, patterns, points,
            lambda: state.evaluate(desc=f"{state.stage_name} {name}"),
            cfg.granularity, state.masks,
        )
        rows = [{**dense_row, "sparsity": _scope_sparsity(state.model, patterns)}] + rows
        for r in rows:
            r.update(curve=name, drop=dense["top1"] - r["top1"])
            state.log.info(f"{state.stage_name} [{name}] sparsity {r['sparsity']:.3f}: top1 {r['top1']:.2f}% (drop {r['drop']:+.2f})")
        xs, ys = [r["target"] for r in rows], [r["top1"] for r in rows]
        ti, ci = tolerance_knee(xs, ys, dense["top1"], cfg.tolerance), kneedle(xs, ys)
        curves[name] = {
            "scope": patterns,
            "tolerance_knee": xs[ti] if ti is not None else None,
            "tolerance_knee_top1": ys[ti] if ti is not None else None,
            "curvature_knee": xs[ci] if ci is not None else None,
            "curvature_knee_top1": ys[ci] if ci is not None else None,
        }
        knees[name] = curves[name]
        table += rows
    wall = time.perf_counter() - t0
    n_evals = 1 + len(points) * len(scopes)
    evals = [dense["seconds"]] + [r["seconds"] for r in table if r["target"] > 0]
    eval_mean = statistics.fmean(evals)
    main = curves[PRIMARY]
    state.log.info(
        f"{state.stage_name}: dense {dense['top1']:.2f}%, knee (tolerance {cfg.tolerance:g} pt) {main['tolerance_knee']}, "
        f"curvature knee {main['curvature_knee']}; {n_evals} evaluations in {wall:.1f} s "
        f"(ratio to evaluations alone {wall / (n_evals * eval_mean):.3f})"
    )
    csv_path = _write_csv(state.stage_dir / "sweep.csv", table)
    png = plot_sweep(
        state.stage_dir / "sweep.png", {n: [(r["target"], r["top1"]) for r in table if r["curve"] == n] for n in scopes},
        dense["top1"], knees, cfg.tolerance, title=f"one-shot magnitude sweep ({cfg.granularity}, {dense['images']} eval images)",
    )
    metrics = {
        "dense_top1": dense["top1"],
        "dense_top5": dense["top5"],
        "eval_images": dense["images"],
        "tolerance": cfg.tolerance,
        "knee": main["tolerance_knee"],
        "knee_top1": main["tolerance_knee_top1"],
        "knee_curvature": main["curvature_knee"],
        "knee_curvature_top1": main["curvature_knee_top1"],
        "curves": curves,
        "table": [{k: r[k] for k in ("curve", "target", "sparsity", "top1", "top5", "loss", "drop", "seconds", "masks_hash")} for r in table],
        "evaluations": n_evals,
        "sweep_wall_s": wall,
        "eval_s_mean": eval_mean,
        "cost_ratio": wall / (n_evals * eval_mean),
        "applied": cfg.apply,
    }
    if cfg.apply != "none":
        s = main["tolerance_knee" if cfg.apply == "tolerance_knee" else "curvature_knee"]
        if s is None:
            raise ValueError(f"essential_sparsity apply: {cfg.apply}: the sweep found no such knee; use apply: none")
        state.masks = {**state.masks, **prune_masks(state.model, cfg.scope, s, cfg.granularity, state.masks)}
        apply_masks_(state.model, state.masks)
        metrics.update(applied_sparsity=s, **mask_report(state, cfg.scope))
        state.log.info(f"{state.stage_name}: pruned {cfg.scope} at the {cfg.apply.replace('_', ' ')} {s:g}")
    return StageResult(
        metrics=metrics, artifacts={"sweep_csv": csv_path, "sweep_png": png}, model_changed=cfg.apply != "none",
    )


def _scope_sparsity(model, patterns) -> float:
    from lotus_deploy.masks import weight_stats
    from lotus_deploy.scope import select_weights

    return weight_stats(model, list(select_weights(model, patterns)))["sparsity"]
