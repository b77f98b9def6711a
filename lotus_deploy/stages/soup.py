"""``instant_soup``: Instant Soup Pruning (ISP, Jaiswal et al., ICML 2023) and LOTUS's ISSP ablation.

Each round starts from the current (masked) model. Learners (copies of it) each train with a
constant learning rate on their own random ``data_fraction`` of the training subset (own seed);
the ``combine`` strategy (:data:`lotus_deploy.prune.soup.COMBINES`) cuts their masks (global
magnitude, or ``criterion: wanda``: |w| x input norm on each learner's own activations over
``calibration_images`` train images) and merges them; the merged mask is put on the main
model, and the main model trains on a fraction of the data with it enforced. Rounds stop within
``stop_within`` of the target; the remainder is pruned one-shot (same criterion) and the model
fine-tuned. ``sparsegpt`` is not offered: its point is the reconstructed weights, which a learner
discards when only its mask is merged.

``combine: union_levels`` (LOTUS ISSP) runs one round with one learner cut at several sparsity
``levels``; the union of nested magnitude masks is the least sparse level's mask, which the
round records (``union_equals_least_sparse``, each level's accuracy); the rest of the way to the
target is plain one-shot pruning (or nothing, with ``prune_remainder: false``).

Resumable inside the stage: after every round the model, masks and round records are written
atomically to ``soup_round.safetensors`` in the stage directory; a rerun of the stage with the
same fingerprint (recipe up to this stage and input masks) continues after the last saved round.
Every round and learner is seeded from (stage seed, round, learner) alone, so a resumed run
draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import math

from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.soup import (
    COMBINES,
    ROUND_FILE,
    cap_sparsity,
    fraction_indices,
    load_round,
    rounds_needed,
    save_round,
    scope_masks,
    strided,
    train_on_fraction,
    violations,
)
from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import (
    calibration,
    calibration_batch,
    mask_report,
    resolve_sparsity,
    train_settings,
)

ROUNDS_CSV_FIELDS = ["round", "start_sparsity", "learner_goal", "sparsity", "combined_top1", "main_top1", "learner_top1",
                     "learner_sparsity", "levels", "level_sparsity", "violations", "combined_masks_hash"]


class _Ctx:
    """What one soup run carries between rounds (for :func:`play_round`)."""

    def __init__(self, cfg, state, target, base_seed, bs):
        self.cfg, self.state, self.target, self.base_seed, self.bs = cfg, state, target, base_seed, bs
        self.combine = COMBINES[cfg.combine]
        self.images = {"learners": 0, "main": 0, "finetune": 0}
        self.calib = None  # calibration images (criterion: wanda), loaded on first use
        self.scores = None if cfg.criterion == "magnitude" else self.criterion_scores

    def criterion_scores(self, model) -> dict:
        """The criterion's scores of ``model``'s weights in scope, on its own calibration activations."""
        from lotus_deploy.prune.criteria import CRITERIA
        from lotus_deploy.scope import select_weights

        weights = {k: p.detach() for k, p in select_weights(model, self.cfg.scope).items()}
        if self.calib is None:
            self.calib = calibration_batch(self.state, self.cfg.calibration_images)
        stats = calibration(self.state, [self.cfg.criterion], list(weights), self.calib, model=model)
        return CRITERIA[self.cfg.criterion].scores(weights, stats)

    def spec(self, epochs: float):
        from lotus_deploy.train import TrainSpec

        c, k = self.cfg, self.cfg.round_lr_scale
        return TrainSpec(train="all", epochs=epochs, lr=k * c.lr, backbone_lr=c.backbone_lr and k * c.backbone_lr, weight_decay=c.weight_decay,
                         warmup=0.0, schedule="constant", label_smoothing=c.label_smoothing, grad_clip=c.grad_clip, eval_every_epoch=False)

    def evaluate(self, model, desc: str) -> float:
        from torch.utils.data import DataLoader, Subset

        from lotus_deploy.train import evaluate

        data = self.state.data
        ds = data.eval_dataset()
        if self.cfg.eval_images is not None and self.cfg.eval_images < len(ds):
            ds = Subset(ds, strided(len(ds), self.cfg.eval_images))
        bs = data.cfg.eval_batch_size or data.cfg.batch_size
        return evaluate(model, DataLoader(ds, batch_size=bs), self.state.device, desc=desc)["top1"]

    def train(self, model, r: int, who: int, fraction: float, epochs: float, desc: str) -> int:
        """Train ``model`` in round ``r`` on its seeded ``fraction`` of the data; returns images seen."""
        state = self.state
        seed = self.base_seed + 1000 * (r + 1) + who
        idx = fraction_indices(len(state.data.train), fraction, seed)
        return train_on_fraction(model, state.data, idx, self.spec(epochs), seed, self.bs, state.device,
                                 masks=state.masks, log=state.log.debug, desc=desc)


def play_round(ctx: _Ctx, r: int, current: float) -> dict:
    """One soup round on ``ctx.state`` (model and masks updated in place); returns its record.

    Args:
        r: round index (0-based); seeds derive from it.
        current: in-scope sparsity (fraction) before the round.
    """
    import copy

    from lotus_deploy.masks import apply_masks_, mask_sparsity, masks_hash
    from lotus_deploy.progress import bar

    cfg, state, combine = ctx.cfg, ctx.state, ctx.combine
    existing = scope_masks(state.model, cfg.scope, state.masks)
    goals = combine.goals(current, cfg.step, ctx.target, cfg.levels)
    rec: dict = {"round": r + 1, "start_sparsity": current, "learner_goal": None, "learner_top1": [], "learner_sparsity": [], "violations": 0}
    sets = []
    for j in bar(range(combine.learners or cfg.learners), desc=f"round {r + 1} learners", unit="learner"):
        learner = copy.deepcopy(state.model)
        ctx.images["learners"] += ctx.train(learner, r, j, cfg.data_fraction, cfg.learner_epochs, f"round {r + 1} learner {j + 1}")
        rec["violations"] += violations(learner, state.masks)
        masks = combine.learner_masks(learner, cfg.scope, goals, existing, ctx.scores)
        for goal, m in zip(goals, masks):
            if cfg.eval_rounds:
                probe = learner if len(masks) == 1 else copy.deepcopy(learner)
                apply_masks_(probe, m)
                rec["learner_top1"].append(ctx.evaluate(probe, f"round {r + 1} {combine.label(j, goal)}"))
                del probe
        sets += masks
        del learner
    combined = combine.merge(sets)
    if mask_sparsity(combined) > ctx.target + 1e-12:  # intersection / vote can overshoot the target
        rec["capped_from"] = mask_sparsity(combined)
        weights = {k: p.detach() for k, p in state.model.named_parameters() if k in existing}
        combined = cap_sparsity(combined, weights, ctx.target, existing)
    rec.update(combine.record(goals, sets, combined))
    state.masks = {**state.masks, **combined}
    apply_masks_(state.model, state.masks)
    rec["sparsity"] = mask_sparsity(combined)
    rec["combined_masks_hash"] = masks_hash(combined)
    if cfg.eval_rounds:
        rec["combined_top1"] = ctx.evaluate(state.model, f"round {r + 1} combined")
    if cfg.main_epochs > 0:
        ctx.images["main"] += ctx.train(state.model, r, 999, cfg.main_fraction or cfg.data_fraction, cfg.main_epochs, f"round {r + 1} main")
        rec["violations"] += violations(state.model, state.masks)
        if cfg.eval_rounds:
            rec["main_top1"] = ctx.evaluate(state.model, f"round {r + 1} main")
    rec["images_seen"] = dict(ctx.images)
    return rec


def _fingerprint(state) -> str:
    """What the round checkpoint depends on: the recipe up to this stage and the input masks."""
    from lotus_deploy.files import sha256_json
    from lotus_deploy.masks import masks_hash
    from lotus_deploy.recipe import stage_fingerprint

    return sha256_json({
        "stage": stage_fingerprint(state.recipe, state.stage_index - 1),
        "input_masks": masks_hash(state.masks) if state.masks else None,
    })


def _finetune(ctx: _Ctx, steps: int) -> list[dict]:
    """The final fine-tune over the training subset (cosine after warm-up), masks enforced."""
    import torch

    from lotus_deploy.train import TrainSpec, train

    cfg, state = ctx.cfg, ctx.state
    seed = ctx.base_seed + 999_999
    seen = [0]

    def make_loader(epoch: int):
        for batch in state.data.train_loader(seed=seed + epoch, batch_size=ctx.bs):
            seen[0] += len(batch[1])
            yield batch

    spec = TrainSpec(train="all", steps=steps, lr=cfg.lr, backbone_lr=cfg.backbone_lr, weight_decay=cfg.weight_decay,
                     warmup=cfg.finetune_warmup, schedule="cosine", label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                     eval_every_epoch=False)
    torch.manual_seed(seed)
    history = train(state.model, spec, make_loader, math.ceil(len(state.data.train) / ctx.bs), state.device, masks=state.masks,
                    log=state.log.info, desc=f"{state.stage_name} fine-tune")
    ctx.images["finetune"] = seen[0]
    return history


@register_stage(InstantSoup)
def instant_soup(cfg: InstantSoup, state):
    from lotus_deploy.files import write_csv
    from lotus_deploy.masks import (
        apply_masks_,
        magnitude_masks,
        mask_sparsity,
        masks_hash,
    )
    from lotus_deploy.plots import plot_soup_rounds
    from lotus_deploy.progress import bar
    from lotus_deploy.state import StageResult

    cfg = train_settings(cfg, state)
    target, provenance = resolve_sparsity(cfg.sparsity, state, cfg.scope)
    bs = cfg.batch_size or state.data.cfg.batch_size
    ctx = _Ctx(cfg, state, target, state.seed(), bs)
    combine = ctx.combine
    path = state.stage_dir / ROUND_FILE
    fingerprint = _fingerprint(state)
    start = mask_sparsity(scope_masks(state.model, cfg.scope, state.masks))
    rounds: list[dict] = []
    resumed = load_round(path, fingerprint)
    resumed_after = None
    if resumed is not None:
        sd, masks, rounds, ctx.images = resumed
        resumed_after = len(rounds)
        state.model.load_state_dict(sd)
        state.model.to(state.device)
        state.masks = {k: v.to(state.device) for k, v in masks.items()}
        state.log.info(f"{state.stage_name}: resuming after round {len(rounds)} from {path.name}")
    elif path.exists():
        state.log.warning(f"{state.stage_name}: ignoring {path.name} (another recipe, input or unreadable)")
    current = rounds[-1]["sparsity"] if rounds else start
    if start >= target:
        state.log.warning(f"{state.stage_name}: the scope is already at sparsity {start:.4f} >= target {target:.4f}; only fine-tuning")
    max_rounds = combine.rounds or cfg.max_rounds
    est = len(rounds) + rounds_needed(current, cfg.step, target, cfg.stop_within, max_rounds - len(rounds))
    state.log.info(f"{state.stage_name}: {cfg.combine} soup from sparsity {current:.4f} to {target:.4f} "
                   f"({combine.learners or cfg.learners} learner(s), about {est} round(s))")
    pbar = bar(total=est, initial=len(rounds), desc=f"{state.stage_name} rounds", unit="round")
    while len(rounds) < max_rounds and target - current > cfg.stop_within + 1e-9:
        rec = play_round(ctx, len(rounds), current)
        rounds.append(rec)
        current = rec["sparsity"]
        save_round(path, state.model, state.masks, rounds, ctx.images, fingerprint)
        accs = f", learners {['%.1f' % a for a in rec['learner_top1']]}" if rec["learner_top1"] else ""
        state.log.info(f"{state.stage_name} round {rec['round']}: sparsity {current:.4f}{accs}"
                       + (f", combined {rec['combined_top1']:.2f}%" if "combined_top1" in rec else ""))
        pbar.update(1)
        if rec["sparsity"] <= rec["start_sparsity"] + 1e-12 and combine.rounds is None:
            state.log.warning(f"{state.stage_name}: round {rec['round']} pruned nothing (learners disagree on every weight); stopping the rounds")
            break
    pbar.close()
    converged = target - current <= cfg.stop_within + 1e-9
    if not converged and combine.rounds is None:
        state.log.warning(f"{state.stage_name}: stopped at sparsity {current:.4f}, {target - current:.4f} short of the target")
    soup_sparsity = current
    remainder = 0.0
    if cfg.prune_remainder and current < target:
        existing = scope_masks(state.model, cfg.scope, state.masks)
        if ctx.scores is None:
            new = prune_masks(state.model, cfg.scope, target, "global", existing)
        else:
            new = magnitude_masks(ctx.scores(state.model), target, "global", existing)
        state.masks = {**state.masks, **new}
        apply_masks_(state.model, state.masks)
        current = mask_sparsity(new)
        remainder = current - soup_sparsity
    oneshot_top1 = state.evaluate(desc=f"{state.stage_name} before fine-tune")["top1"] if cfg.eval_rounds else None

    used = ctx.images["learners"] + ctx.images["main"]
    if cfg.budget_images is not None:
        steps = max(0, (cfg.budget_images - used) // bs)  # never past the budget (short by < one batch)
    elif cfg.finetune_steps is not None:
        steps = cfg.finetune_steps
    else:
        steps = int(round(cfg.finetune_epochs * math.ceil(len(state.data.train) / bs)))
    history = _finetune(ctx, steps) if steps > 0 else []
    final = state.evaluate(desc=f"{state.stage_name} eval")
    total = sum(ctx.images.values())
    report = mask_report(state, cfg.scope)
    state.log.info(f"{state.stage_name}: sparsity {report['scope_sparsity']:.4f} after {len(rounds)} round(s) "
                   f"(+{remainder:.4f} one-shot), top1 {final['top1']:.2f}%, {total} images seen")
    csv_path = write_csv(state.stage_dir / "rounds.csv", rounds, ROUNDS_CSV_FIELDS)
    png = plot_soup_rounds(state.stage_dir / "rounds.png", rounds, target) if rounds else None
    metrics = {
        "top1": final["top1"], "top5": final["top5"], "eval_images": final["images"],
        "target": target, **provenance, "combine": cfg.combine,
        "start_sparsity": start, "soup_sparsity": soup_sparsity, "remainder_pruned": remainder,
        "rounds_converged": converged, "n_rounds": len(rounds),
        "resumed_after_round": resumed_after,
        "top1_before_finetune": oneshot_top1, "finetune_steps": steps,
        "images_seen": {**ctx.images, "total": total},
        "budget_images": cfg.budget_images,
        "budget_exceeded": cfg.budget_images is not None and used > cfg.budget_images,  # the rounds alone
        "violations": sum(r["violations"] for r in rounds) + violations(state.model, state.masks),
        "rounds": rounds, "finetune_history": history, **report,
        "final_masks_hash": masks_hash(state.masks),
        **combine.summary(rounds),
    }
    if path.exists():
        path.unlink()  # the stage's own checkpoint replaces it
    arts = {"rounds_csv": csv_path}
    if png is not None:
        arts["rounds_png"] = png
    return StageResult(metrics=metrics, artifacts=arts)
