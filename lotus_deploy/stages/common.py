"""Helpers shared by several stages: mask reports, knee sparsities, training and the early bird.

Everything here takes the stage's run state (``state``: model, masks, data, log, stage
directory); the algorithms it calls live in :mod:`lotus_deploy.prune`. torch is imported inside
the functions.
"""

from __future__ import annotations

import math
from typing import Sequence

from lotus_deploy.recipe.base import KNEE_VALUES
from lotus_deploy.recipe.stages import PRIMARY


def mask_report(state, scope) -> dict:
    """Sparsity (fraction) of the scope and of the whole model, parameter and non-zero counts."""
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


def resolve_sparsity(value, state, scope: Sequence[str] | None = None) -> tuple[float, dict]:
    """A stage's sparsity field as a number: numbers pass, knee words come from the sweep.

    Args:
        value: a fraction, ``knee`` (tolerance knee) or ``knee_curvature`` (Kneedle knee).
        scope: the asking stage's scope; the sweep curve with the same patterns is used, else
            the sweep's primary ``scope`` curve (a warning is logged).

    Returns:
        (sparsity, provenance dict for the manifest; empty for plain numbers).

    Raises:
        ValueError: no finished essential_sparsity stage, or its curve has no such knee.
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
    s = curves[name][value]
    if s is None:
        raise ValueError(f"sparsity: {value}: the sweep found no such knee on its {name!r} curve; use a number or `knee`")
    return float(s), {"sparsity_from": value, "sweep_curve": name, "resolved_sparsity": float(s)}


def train_settings(cfg, state):
    """``cfg`` with its unset training fields taken from the recipe's ``train:`` section.

    Stages of a parsed recipe are resolved already (this returns them as they are); a config
    built on its own (a test, a benchmark script) is resolved here.
    """
    return state.recipe.train.resolve(cfg, state.recipe.data.batch_size)


def load_variant(state, name: str, what: str):
    """(model, manifest entry) of a finished variant of this run: frozen, eval mode, on the state's device.

    In a distributed run rank 0 reads the checkpoint and the others receive its weights (the run
    folder need not be visible from every node).

    Raises:
        RunError: ``name`` is not a finished variant of the run.
    """
    from lotus_deploy import distributed as dist
    from lotus_deploy.errors import RunError
    from lotus_deploy.models import build_model
    from lotus_deploy.run import load_checkpoint, variant_entries

    entries = variant_entries(state.recipe, state.manifest)
    if name not in entries:
        raise RunError(f"{state.stage_name}: {what} {name!r} is not a finished variant of this run; have: {', '.join(entries)}")
    model = build_model(state.recipe.model, with_weights=False)
    if dist.is_main():
        load_checkpoint(state.run_dir, entries[name], model, state.device)
    else:
        model.to(state.device)
    dist.broadcast_module_(model, what=f"the {what} {name}")
    return model.eval().requires_grad_(False), entries[name]


def distiller(cfg, state):
    """The :class:`~lotus_deploy.train.Distiller` of a stage's ``distill`` section and its record for the metrics."""
    from lotus_deploy.train import Distiller

    d = cfg.distill
    teacher, entry = load_variant(state, d.teacher, "distill.teacher")
    record = {
        "teacher": d.teacher, "alpha": d.alpha, "temperature": d.temperature,
        "teacher_checkpoint": entry["artifacts"]["model"]["path"], "teacher_top1": (entry.get("metrics") or {}).get("top1"),
    }
    state.log.info(f"{state.stage_name}: distilling from {d.teacher} ({record['teacher_checkpoint']}), alpha {d.alpha}, T {d.temperature}")
    return Distiller(teacher, d.alpha, d.temperature), record


def run_training(cfg, state, forward=None, make_loader=None, steps_per_epoch=None, metrics=None, **hooks):
    """Train ``state.model`` per a :class:`~lotus_deploy.recipe.stages.Finetune` config, masks enforced.

    Args:
        forward: ``(x, extra) -> logits`` for batches with an extra item (token dropping).
        make_loader: ``epoch -> batches``; default the state's shuffled training loader.
        metrics: the stage's metrics; ``distill`` (teacher, alpha, T) is put there when the
            config distils.
        hooks: ``on_step`` / ``on_epoch`` callbacks of :func:`lotus_deploy.train.train`.

    Returns:
        (history, final eval metrics).
    """
    from lotus_deploy.train import train

    cfg = train_settings(cfg, state)
    distill = None
    if getattr(cfg, "distill", None) is not None:
        distill, record = distiller(cfg, state)
        if metrics is not None:
            metrics["distill"] = record
    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    seed = state.seed()
    if make_loader is None:
        def make_loader(epoch: int):
            return data.train_loader(seed=seed + 1, batch_size=bs, epoch=epoch)  # distributed: this rank's share

        steps_per_epoch = math.ceil(len(data.train) / bs)
    history = train(
        state.model, cfg.train_spec(), make_loader, steps_per_epoch, state.device, masks=state.masks,
        evaluate_fn=lambda: state.evaluate(desc=f"{state.stage_name} eval"), forward=forward, distill=distill,
        log=state.log.info, desc=state.stage_name, **hooks,
    )
    final = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval_")} if history else {}
    if not final:
        final = state.evaluate()
    return history, final


def write_history(state, history: list[dict]):
    """history.csv of per-epoch metrics in the stage directory."""
    from lotus_deploy.files import write_csv

    return write_csv(state.stage_dir / "history.csv", history)


def early_bird_watch(cfg, state):
    """The early-bird watch of a training stage with ``early_bird`` set (knee words resolved)."""
    from lotus_deploy.prune.early_bird import EarlyBirdDetector, EarlyBirdWatch

    eb = cfg.early_bird
    sparsity, provenance = resolve_sparsity(eb.sparsity, state, eb.scope)
    bs = cfg.batch_size or state.data.cfg.batch_size
    watch = EarlyBirdWatch(
        state.model, eb.scope, sparsity, EarlyBirdDetector(eb.window, eb.threshold), every=eb.every, stop=eb.stop,
        steps_per_epoch=math.ceil(len(state.data.train) / bs), existing=state.masks, log=state.log.info,
    )
    watch.provenance = provenance
    return watch


def finish_early_bird(watch, state, history: list[dict], metrics: dict, artifacts: dict) -> None:
    """Put the watch's summary in ``metrics["early_bird"]`` and its files in ``artifacts`` (in place)."""
    metrics["early_bird"], eb_arts = watch.finish(state.stage_dir)
    metrics["early_bird"].update(steps_trained=history[-1]["step"] if history else 0, **watch.provenance)
    artifacts.update(eb_arts)


def calibration(state, criteria: Sequence[str], names: Sequence[str], images, model=None, forward=None):
    """Calibration statistics the ``criteria`` need for the Linear weights ``names``, or None.

    Runs the calibration images through ``model`` (default ``state.model``) once, with hooks on
    the layers (:func:`lotus_deploy.prune.calibration.calibrate`); ``forward`` replaces the
    model's own forward (e.g. token dropping) so the statistics follow the sequence the stage
    runs on. In a distributed run each rank runs its share of the batches and the sums are
    all-reduced (:func:`lotus_deploy.prune.calibration.all_reduce_`): every rank ends with the
    statistics of every image.

    Args:
        images: how many train-split images (:func:`calibration_batch`), or that batch itself
            ``(n, C, H, W)`` when a stage calibrates several models on the same images.
    """
    from lotus_deploy import distributed as dist
    from lotus_deploy.prune.calibration import all_reduce_, calibrate
    from lotus_deploy.prune.criteria import statistic_for

    statistic = statistic_for(criteria)
    if statistic is None:
        return None
    x = calibration_batch(state, images) if isinstance(images, int) else images
    bs = state.data.cfg.eval_batch_size or state.data.cfg.batch_size
    stats = all_reduce_(calibrate(model or state.model, names, dist.shard(x.split(bs)), statistic, forward=forward, device=state.device))
    state.log.info(f"{state.stage_name}: calibrated {len(names)} layers ({statistic}) on {stats.images} train images in {stats.seconds:.1f} s")
    return stats


def calibration_batch(state, images: int):
    """``(n, C, H, W)``: ``images`` train-split images, eval transform, class-balanced, seeded by ``data.subset_seed``."""
    from lotus_deploy.export.precision import calibration_images

    return calibration_images(state.data, images, state.recipe.data.subset_seed)
