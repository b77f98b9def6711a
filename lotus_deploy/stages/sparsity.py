"""``essential_sparsity``: sweep one-shot pruning from the same dense weights, find the knees.

The sweep (:func:`lotus_deploy.prune.sweep.sweep`) is a measurement: each point prunes the
*current* weights to one sparsity, evaluates and restores them, so points never compound. One
curve per scope and criterion (``criteria``: magnitude by default; wanda and sparsegpt share one
calibration pass over ``calibration_images`` train images of the model entering the stage); the
``knee_criterion``'s curves keep the scope names, the others are ``<scope>/<criterion>``. The
knees of each curve are recorded in the manifest under their knee words; later stages say
``sparsity: knee`` (tolerance knee) or ``sparsity: knee_curvature`` (Kneedle knee) to use them,
resolved by :func:`lotus_deploy.stages.common.resolve_sparsity`. ``apply: knee`` (or
``knee_curvature``) also prunes ``scope`` there.
"""

from __future__ import annotations

from lotus_deploy.prune.criteria import apply_pruned_, prune_model
from lotus_deploy.prune.sweep import knees, sweep
from lotus_deploy.recipe.stages import PRIMARY, EssentialSparsity
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import calibration, mask_report

CSV_FIELDS = ["curve", "criterion", "target", "sparsity", "top1", "top5", "loss", "drop", "images", "seconds", "prune_s", "masks_hash"]


@register_stage(EssentialSparsity)
def essential_sparsity(cfg: EssentialSparsity, state):
    import statistics
    import time

    from lotus_deploy.files import write_csv
    from lotus_deploy.plots import plot_sweep
    from lotus_deploy.scope import select_weights
    from lotus_deploy.state import StageResult

    state.data.eval_dataset()  # decode/cache before timing: the sweep measures evaluations only
    scopes = {PRIMARY: list(cfg.scope), **{k: list(v) for k, v in cfg.scopes.items()}}
    points = [s for s in cfg.sparsities if s > 0]
    criteria = [cfg.knee_from] + [c for c in cfg.criteria if c != cfg.knee_from]  # the knee's curves first
    names = sorted({k for p in scopes.values() for k in select_weights(state.model, p)})
    stats = calibration(state, criteria, names, cfg.calibration_images)  # before the clock: the sweep measures evaluations
    t0 = time.perf_counter()
    dense = state.evaluate(desc=f"{state.stage_name} dense")
    dense_row = {"target": 0.0, "sparsity": None, "masks_hash": None, "prune_s": 0.0, **dense}
    table, curves = [], {}
    for scope_name, patterns in scopes.items():
        for crit in criteria:
            name = scope_name if crit == cfg.knee_from else f"{scope_name}/{crit}"
            rows = sweep(
                state.model, patterns, points,
                lambda: state.evaluate(desc=f"{state.stage_name} {name}"),
                cfg.granularity, state.masks, crit, stats,
            )
            rows = [{**dense_row, "sparsity": _scope_sparsity(state.model, patterns)}] + rows
            for r in rows:
                r.update(curve=name, criterion=crit, drop=dense["top1"] - r["top1"])
                state.log.info(f"{state.stage_name} [{name}] sparsity {r['sparsity']:.3f}: top1 {r['top1']:.2f}% (drop {r['drop']:+.2f})")
            curves[name] = {"scope": patterns, "criterion": crit,
                            **knees([r["target"] for r in rows], [r["top1"] for r in rows], dense["top1"], cfg.tolerance)}
            table += rows
    wall = time.perf_counter() - t0
    n_evals = 1 + len(points) * len(scopes) * len(criteria)
    eval_mean = statistics.fmean([dense["seconds"]] + [r["seconds"] for r in table if r["target"] > 0])
    main = curves[PRIMARY]
    state.log.info(
        f"{state.stage_name}: dense {dense['top1']:.2f}%, knee (tolerance {cfg.tolerance:g} pt) {main['knee']}, "
        f"curvature knee {main['knee_curvature']}; {n_evals} evaluations in {wall:.1f} s "
        f"(ratio to evaluations alone {wall / (n_evals * eval_mean):.3f})"
    )
    csv_path = write_csv(state.stage_dir / "sweep.csv", table, CSV_FIELDS)
    png = plot_sweep(
        state.stage_dir / "sweep.png", {n: [(r["target"], r["top1"]) for r in table if r["curve"] == n] for n in curves},
        dense["top1"], curves, cfg.tolerance, title=f"one-shot {', '.join(criteria)} sweep ({cfg.granularity}, {dense['images']} eval images)",
    )
    metrics = {
        "dense_top1": dense["top1"],
        "dense_top5": dense["top5"],
        "eval_images": dense["images"],
        "tolerance": cfg.tolerance,
        "knee_criterion": cfg.knee_from,
        "calibration_images": stats.images if stats else 0,
        "calibration_s": stats.seconds if stats else 0.0,
        **{k: main[k] for k in ("knee", "knee_top1", "knee_curvature", "knee_curvature_top1")},
        "curves": curves,
        "table": [{k: r[k] for k in ("curve", "criterion", "target", "sparsity", "top1", "top5", "loss", "drop", "seconds", "prune_s", "masks_hash")} for r in table],
        "evaluations": n_evals,
        "sweep_wall_s": wall,
        "eval_s_mean": eval_mean,
        "cost_ratio": wall / (n_evals * eval_mean),
        "applied": cfg.apply,
    }
    if cfg.apply != "none":
        s = main[cfg.apply]
        if s is None:
            raise ValueError(f"essential_sparsity apply: {cfg.apply}: the sweep found no such knee; use apply: none")
        pruned = prune_model(state.model, cfg.scope, s, cfg.granularity, state.masks, cfg.knee_from, stats)
        state.masks = {**state.masks, **pruned.masks}
        apply_pruned_(state.model, pruned, state.masks)
        metrics.update(applied_sparsity=s, **mask_report(state, cfg.scope))
        state.log.info(f"{state.stage_name}: pruned {cfg.scope} ({cfg.knee_from}) at the {cfg.apply.replace('_', ' ')} {s:g}")
    return StageResult(
        metrics=metrics, artifacts={"sweep_csv": csv_path, "sweep_png": png}, model_changed=cfg.apply != "none",
    )


def _scope_sparsity(model, patterns) -> float:
    from lotus_deploy.masks import weight_stats
    from lotus_deploy.scope import select_weights

    return weight_stats(model, list(select_weights(model, patterns)))["sparsity"]
