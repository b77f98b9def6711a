"""``instant_soup``: Instant Soup Pruning (ISP, Jaiswal et al., ICML 2023) as its authors run it, and LOTUS's ISSP ablation.

The run is planned before its first step (:func:`lotus_deploy.prune.soup.plan_soup`): the rounds
(each round's goal is the start pruned ``step`` of the remaining weights once more, until the
plan is within ``stop_within`` of the target), every learner's and main-model round's steps, and
the final fine-tune's (``finetune_epochs`` / ``finetune_steps``, or what ``budget_images``
leaves). The main model then keeps ONE AdamW and ONE warm-up -> decay schedule over all its
round steps and the fine-tune (:class:`lotus_deploy.schedule.ScheduledTrainer`).

Each round starts from the current (masked) model. Its learners are independent jobs
(:func:`learner_jobs`, run by :func:`run_learners`, one :func:`lotus_deploy.prune.soup.train_learner`
each): a copy of the main model trained with a fresh AdamW warmed up linearly from zero over its
steps on its own random ``data_fraction`` of the training subset (own seed), then cut by the
``combine`` strategy (:data:`lotus_deploy.prune.soup.COMBINES`: global magnitude, or ``criterion:
wanda``: |w| x input norm on the learner's own activations over ``calibration_images`` train
images). Their masks merge (intersection and vote are capped at the round's goal), the merged mask
is put on the main model, and the main model trains on ``main_fraction`` of the data with it
enforced. After the planned rounds the remainder is pruned one-shot (same criterion) and the fine-
tune continues the main model's schedule. ``sparsegpt`` is not offered: its point is the
reconstructed weights, which a learner discards when only its mask is merged.

``combine: union_levels`` (LOTUS ISSP) runs one round with one learner cut at several sparsity
``levels``; the union of nested magnitude masks is the least sparse level's mask, which the
round records (``union_equals_least_sparse``, each level's accuracy); the rest of the way to the
target is plain one-shot pruning (or nothing, with ``prune_remainder: false``).

Distributed (``torchrun``, :mod:`lotus_deploy.distributed`): a round's learners are spread over
the ranks (:func:`run_learners`: rank ``r`` trains jobs ``r, r + world, ...`` alone, without DDP
or a sharded loader); their masks (CPU bool tensors), images, top-1 and wall times are gathered
in job order, so every rank merges the same masks. The main model trains under DDP (each rank
its share of every global batch of its seeded ``main_fraction``, and of the fine-tune's);
masks and weights are compared by hash over the ranks after every round. Evaluations are
sharded (every eval image on one rank, counts summed). Rank 0 alone writes and reads the round
checkpoint, and hands a resumed state to the others.

Resumable inside the stage: after every round the model, masks, the main model's optimizer
state and global step, and the round records are written atomically to
``soup_round.safetensors`` in the stage directory; a rerun of the stage with the same fingerprint
(recipe up to this stage and input masks) continues after the last saved round. Every round and
learner is seeded from (stage seed, round, learner) alone, so a resumed run draws the same masks
and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import replace

from lotus_deploy import distributed as dist
from lotus_deploy.errors import RunError
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.prune.soup import (
    COMBINES,
    ROUND_FILE,
    LearnerJob,
    LearnerResult,
    cap_sparsity,
    fraction_batches,
    fraction_indices,
    learner_spec,
    load_round,
    plan_soup,
    save_round,
    scope_masks,
    strided,
    train_learner,
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

ROUNDS_CSV_FIELDS = ["round", "start_sparsity", "planned_start", "learner_goal", "sparsity", "combined_top1", "main_top1",
                     "learner_top1", "learner_sparsity", "levels", "level_sparsity", "violations", "learner_images",
                     "main_images", "learners_s", "main_s", "round_s", "main_step", "main_lr", "combined_masks_hash",
                     "learner_ranks", "learner_s"]
MAIN = 999  # the main model's "learner" index in a round's seed


class _Ctx:
    """What one soup run carries between rounds (for :func:`play_round`).

    ``plan`` (:class:`lotus_deploy.prune.soup.SoupPlan`) and ``trainer``
    (:class:`lotus_deploy.schedule.ScheduledTrainer`, the main model's one optimizer and
    schedule) are set once the start sparsity is known.
    """

    def __init__(self, cfg, state, target, base_seed, bs):
        self.cfg, self.state, self.target, self.base_seed, self.bs = cfg, state, target, base_seed, bs
        self.combine = COMBINES[cfg.combine]
        self.images = {"learners": 0, "main": 0, "finetune": 0}
        self.calib = None  # calibration images (criterion: wanda), loaded on first use
        self.scores = None if cfg.criterion == "magnitude" else self.criterion_scores
        self.plan = None
        self.trainer = None

    def seed(self, r: int, who: int) -> int:
        """Seed of learner ``who`` (or :data:`MAIN`) in round ``r``: from the stage seed, the round and the learner alone."""
        return self.base_seed + 1000 * (r + 1) + who

    def criterion_scores(self, model) -> dict:
        """The criterion's scores of ``model``'s weights in scope, on its own calibration activations."""
        from lotus_deploy.prune.criteria import CRITERIA
        from lotus_deploy.scope import select_weights

        weights = {k: p.detach() for k, p in select_weights(model, self.cfg.scope).items()}
        if self.calib is None:
            self.calib = calibration_batch(self.state, self.cfg.calibration_images)
        stats = calibration(self.state, [self.cfg.criterion], list(weights), self.calib, model=model)
        return CRITERIA[self.cfg.criterion].scores(weights, stats)

    def evaluate(self, model, desc: str) -> float:
        """Top-1 (%) of ``model`` on the round evaluation images (``eval_images``, strided)."""
        from torch.utils.data import DataLoader, Subset

        from lotus_deploy.train import evaluate

        data = self.state.data
        ds = data.eval_dataset()
        if self.cfg.eval_images is not None and self.cfg.eval_images < len(ds):
            ds = Subset(ds, strided(len(ds), self.cfg.eval_images))
        bs = data.cfg.eval_batch_size or data.cfg.batch_size
        return evaluate(model, DataLoader(ds, batch_size=bs), self.state.device, desc=desc)["top1"]

    def prune_to(self, sparsity: float) -> float:
        """Prune the main model's scope one-shot to ``sparsity`` by the criterion (masks in force stay); returns its sparsity."""
        from lotus_deploy.masks import apply_masks_, magnitude_masks, mask_sparsity

        state = self.state
        existing = scope_masks(state.model, self.cfg.scope, state.masks)
        if self.scores is None:
            new = prune_masks(state.model, self.cfg.scope, sparsity, "global", existing)
        else:
            new = magnitude_masks(self.scores(state.model), sparsity, "global", existing)
        state.masks = {**state.masks, **new}
        apply_masks_(state.model, state.masks)
        return mask_sparsity(new)

    def train_main(self, r: int) -> list[dict]:
        """Round ``r``'s main-model segment: ``plan.main_steps`` steps of the one schedule on its seeded ``main_fraction``."""
        import torch

        state, seed = self.state, self.seed(r, MAIN)
        idx = fraction_indices(len(state.data.train), self.cfg.main_fraction, seed)
        torch.manual_seed(seed)
        batches = fraction_batches(state.data, idx, seed, self.bs, shard=True)  # distributed: this rank's share, under DDP
        return self.trainer.train(batches, self.plan.main_steps, masks=state.masks,
                                  log=state.log.debug, desc=f"round {r + 1} main")


def learner_jobs(ctx: _Ctx, r: int, goals: list[float]) -> list[LearnerJob]:
    """Round ``r``'s learners as independent jobs (each seeded from (stage seed, r, learner) alone)."""
    cfg, state = ctx.cfg, ctx.state
    spec = learner_spec(cfg, ctx.plan.learner_steps)
    return [
        LearnerJob(round=r, learner=j, seed=ctx.seed(r, j), fraction=cfg.data_fraction, spec=spec, goals=list(goals),
                   combine=ctx.combine, scope=list(cfg.scope), model=state.model, masks=dict(state.masks), data=state.data,
                   batch_size=ctx.bs, device=state.device, scores=ctx.scores, evaluate=ctx.evaluate if cfg.eval_rounds else None)
        for j in range(ctx.plan.learners)
    ]


def run_learners(jobs: list[LearnerJob]) -> list[LearnerResult]:
    """Run a round's learner jobs; results in job order, the same on every rank.

    One process runs them one after another on the stage's device. In a distributed run rank
    ``r`` runs jobs ``r, r + world, ...`` (:func:`lotus_deploy.distributed.shard`), each alone
    (:func:`lotus_deploy.distributed.solo`: no DDP, no sharded loader, its evaluation on the
    whole eval subset), and every rank receives every result (masks as CPU bool tensors,
    images, top-1, seconds, the rank that ran it). A job is seeded from (stage seed, round,
    learner) alone, so its masks do not depend on the rank that ran it. With more learners
    than ranks, or a count the world does not divide, a rank with fewer jobs waits in the
    gather for the others: ``LOTUS_DIST_TIMEOUT`` must exceed one learner's wall time.
    """
    from lotus_deploy.progress import bar

    desc = f"round {jobs[0].round + 1} learners" if jobs else "learners"
    if not dist.active():
        return [train_learner(job) for job in bar(jobs, desc=desc, unit="learner")]
    me, share = dist.rank(), list(dist.shard_indices(len(jobs)))  # outside solo(), where every rank is rank 0 of 1
    mine: dict[int, LearnerResult] = {}
    with dist.solo():
        for i in bar(share, desc=desc, unit="learner"):
            mine[i] = replace(train_learner(jobs[i]).to("cpu"), rank=me)
    done: dict[int, LearnerResult] = {}
    for part in dist.all_gather_object(mine, what=f"{desc}: gathering the learners' masks"):
        done.update(part)
    return [done[i].to(jobs[i].device) for i in range(len(jobs))]


def check_ranks(state, what: str) -> None:
    """Raise unless every rank holds the same masks and weights (by hash; nothing in one process).

    Raises:
        RunError: the ranks drifted apart (a bug: the stage's state must stay identical).
    """
    if not dist.active():
        return
    masks = {f"mask/{k}": v for k, v in state.masks.items()}
    if not dist.same_on_all_ranks(masks, what=f"the masks hash check after {what}"):
        raise RunError(f"{state.stage_name}: the ranks hold different masks after {what}")
    weights = {f"model/{k}": v for k, v in state.model.state_dict().items()}
    if not dist.same_on_all_ranks(weights, what=f"the weights hash check after {what}"):
        raise RunError(f"{state.stage_name}: the ranks hold different weights after {what}")


def play_round(ctx: _Ctx, r: int, current: float) -> dict:
    """One soup round on ``ctx.state`` (model and masks updated in place); returns its record.

    Args:
        r: round index (0-based); its goal comes from the plan, its seeds from it.
        current: in-scope sparsity (fraction) before the round.
    """
    from lotus_deploy.masks import apply_masks_, mask_sparsity, masks_hash

    cfg, state, combine, plan = ctx.cfg, ctx.state, ctx.combine, ctx.plan
    t0 = time.perf_counter()
    existing = scope_masks(state.model, cfg.scope, state.masks)
    goals = combine.goals(plan.starts[r], cfg.step, ctx.target, cfg.levels)
    rec: dict = {"round": r + 1, "start_sparsity": current, "planned_start": plan.starts[r], "learner_goal": None,
                 "learner_top1": [], "learner_sparsity": [], "violations": 0}
    results = run_learners(learner_jobs(ctx, r, goals))
    sets = [m for res in results for m in res.masks]
    rec["learner_top1"] = [a for res in results for a in res.top1]
    rec["violations"] += sum(res.violations for res in results)
    rec["learner_images"] = sum(res.images for res in results)
    rec["learner_ranks"] = [res.rank for res in results]
    rec["learner_s"] = [res.seconds for res in results]
    rec["learners_s"] = time.perf_counter() - t0
    ctx.images["learners"] += rec["learner_images"]
    combined = combine.merge(sets)
    goal = max(goals)
    if mask_sparsity(combined) > goal + 1e-12:  # intersection / vote overshoot the round's goal
        rec["capped_from"] = mask_sparsity(combined)
        weights = {k: p.detach() for k, p in state.model.named_parameters() if k in existing}
        combined = cap_sparsity(combined, weights, goal, existing)
    rec.update(combine.record(goals, sets, combined))
    state.masks = {**state.masks, **combined}
    apply_masks_(state.model, state.masks)
    rec["sparsity"] = mask_sparsity(combined)
    rec["combined_masks_hash"] = masks_hash(combined)
    if cfg.eval_rounds:
        rec["combined_top1"] = ctx.evaluate(state.model, f"round {r + 1} combined")
    t1 = time.perf_counter()
    rec["main_images"] = 0
    if plan.main_steps > 0:
        history = ctx.train_main(r)
        rec["main_images"] = sum(h["images"] for h in history)
        rec["main_lr"] = history[-1]["lr"]
        ctx.images["main"] += rec["main_images"]
        rec["violations"] += violations(state.model, state.masks)
        if cfg.eval_rounds:
            rec["main_top1"] = ctx.evaluate(state.model, f"round {r + 1} main")
    rec["main_step"] = ctx.trainer.step
    rec["main_s"] = time.perf_counter() - t1
    rec["round_s"] = time.perf_counter() - t0
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
    """The final fine-tune over the whole training subset: the last ``steps`` of the main model's schedule, masks enforced."""
    import torch

    state = ctx.state
    seed = ctx.base_seed + 999_999
    torch.manual_seed(seed)
    history = ctx.trainer.train(lambda epoch: state.data.train_loader(seed=seed + epoch, batch_size=ctx.bs), steps,
                                masks=state.masks, log=state.log.info, desc=f"{state.stage_name} fine-tune")
    ctx.images["finetune"] = sum(h["images"] for h in history)
    return history


def _start(ctx: _Ctx) -> tuple[float, float]:
    """Prune to the ``start`` sparsity if the config asks; returns (sparsity entering, sparsity the rounds start from)."""
    from lotus_deploy.masks import mask_sparsity

    cfg, state = ctx.cfg, ctx.state
    entering = mask_sparsity(scope_masks(state.model, cfg.scope, state.masks))
    if cfg.start == "input":
        return entering, entering
    start, _ = resolve_sparsity(cfg.start, state, cfg.scope)
    goal = min(start, ctx.target)  # never past the target
    return entering, (ctx.prune_to(goal) if goal > entering else entering)  # never reviving weights


def _resume(ctx: _Ctx, path, fingerprint) -> list[dict]:
    """Round records of a saved round checkpoint with the model, masks and main optimizer restored; [] if none fits.

    In a distributed run rank 0 reads the checkpoint (the run folder need not be visible from
    every node) and hands it to the others (:func:`_share_round`).
    """
    state = ctx.state
    saved = load_round(path, fingerprint) if dist.is_main() else None
    if dist.is_main() and saved is None and path.exists():
        state.log.warning(f"{state.stage_name}: ignoring {path.name} (another recipe, input or unreadable)")
    saved = _share_round(saved)
    if saved is None:
        return []
    if saved.model:  # rank 0 (every rank in one process)
        state.model.load_state_dict(saved.model)  # in place: the optimizer keeps its parameters
    state.model.to(state.device)
    dist.broadcast_module_(state.model, what="the resumed soup model")
    state.masks = {k: v.to(state.device) for k, v in saved.masks.items()}
    ctx.trainer.load_state_tensors(saved.extra_tensors, saved.meta)
    ctx.images = saved.images
    state.log.info(f"{state.stage_name}: resuming after round {len(saved.rounds)} (main step {ctx.trainer.step}) from {path.name}")
    return saved.rounds


def _share_round(saved):
    """Rank 0's round checkpoint (or None) on every rank; the identity in one process.

    The records, masks and metadata travel as one object; the optimizer's tensors are
    broadcast into buffers of their shapes; the model's weights are left to the caller
    (:func:`lotus_deploy.distributed.broadcast_module_`): the other ranks get an empty ``model``.
    """
    import torch

    from lotus_deploy.prune.soup import RoundCheckpoint

    if not dist.active():
        return saved
    head = None
    if saved is not None:
        head = {"rounds": saved.rounds, "images": saved.images, "meta": saved.meta,
                "masks": {k: v.cpu() for k, v in saved.masks.items()},
                "extra": {k: (tuple(v.shape), v.dtype) for k, v in saved.extra_tensors.items()}}
    head = dist.broadcast_object(head, what="the soup round checkpoint")
    if head is None:
        return None
    if saved is None:
        extra = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in head["extra"].items()}
        saved = RoundCheckpoint({}, head["masks"], head["rounds"], head["images"], extra, head["meta"])
    dist.broadcast_tensors_(saved.extra_tensors, what="the soup optimizer state")
    return saved


def _save_round(ctx: _Ctx, path, rounds: list[dict], fingerprint: str) -> None:
    """The round checkpoint, written by rank 0 alone; every rank waits until it is on disk."""
    state = ctx.state
    if dist.is_main():
        save_round(path, state.model, state.masks, rounds, ctx.images, fingerprint, *ctx.trainer.state_tensors())
    dist.barrier(f"writing {path.name}")


@register_stage(InstantSoup)
def instant_soup(cfg: InstantSoup, state):
    from lotus_deploy.files import write_csv
    from lotus_deploy.masks import masks_hash
    from lotus_deploy.plots import plot_soup_rounds
    from lotus_deploy.progress import bar
    from lotus_deploy.schedule import Schedule, ScheduledTrainer
    from lotus_deploy.state import StageResult

    cfg = train_settings(cfg, state)
    target, provenance = resolve_sparsity(cfg.sparsity, state, cfg.scope)
    bs = cfg.batch_size or state.data.cfg.batch_size
    ctx = _Ctx(cfg, state, target, state.seed(), bs)
    combine = ctx.combine
    path = state.stage_dir / ROUND_FILE
    fingerprint = _fingerprint(state)
    entering, start = _start(ctx)
    plan = ctx.plan = plan_soup(cfg, start, target, len(state.data.train), bs, combine.learners or cfg.learners,
                                combine.rounds or cfg.max_rounds)
    schedule = Schedule.of(plan.main_total_steps, cfg.warmup, cfg.schedule)
    ctx.trainer = ScheduledTrainer(state.model, schedule, cfg.lr, cfg.backbone_lr, cfg.weight_decay,
                                   label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip, device=state.device)
    rounds = _resume(ctx, path, fingerprint)
    resumed_after = len(rounds) if rounds else None
    current = rounds[-1]["sparsity"] if rounds else start
    if start >= target:
        state.log.warning(f"{state.stage_name}: the scope is already at sparsity {start:.4f} >= target {target:.4f}; only fine-tuning")
    if not plan.reaches_target and combine.rounds is None:
        state.log.warning(f"{state.stage_name}: max_rounds {cfg.max_rounds} cuts the plan short of the target; the rest is one-shot")
    state.log.info(f"{state.stage_name}: {cfg.combine} soup from sparsity {start:.4f} to {target:.4f}: {plan.rounds} round(s) of "
                   f"{plan.learners} learner(s) x {plan.learner_steps} step(s) and {plan.main_steps} main step(s), fine-tune "
                   f"{plan.finetune_steps} step(s); one schedule of {schedule.total} steps ({schedule.warmup} warm-up, {schedule.kind})")
    pbar = bar(total=plan.rounds, initial=len(rounds), desc=f"{state.stage_name} rounds", unit="round")
    for r in range(len(rounds), plan.rounds):
        rec = play_round(ctx, r, current)
        rounds.append(rec)
        current = rec["sparsity"]
        check_ranks(state, f"round {rec['round']}")
        _save_round(ctx, path, rounds, fingerprint)
        accs = f", learners {['%.1f' % a for a in rec['learner_top1']]}" if rec["learner_top1"] else ""
        state.log.info(f"{state.stage_name} round {rec['round']}/{plan.rounds}: sparsity {current:.4f}{accs}"
                       + (f", combined {rec['combined_top1']:.2f}%" if "combined_top1" in rec else "")
                       + (f", main {rec['main_top1']:.2f}%" if "main_top1" in rec else "") + f", {rec['round_s']:.0f} s")
        pbar.update(1)
        if rec["sparsity"] <= rec["start_sparsity"] + 1e-12 and combine.rounds is None:
            state.log.warning(f"{state.stage_name}: round {rec['round']} pruned nothing (learners disagree on every weight)")
    pbar.close()
    converged = target - current <= cfg.stop_within + 1e-9
    soup_sparsity = current
    remainder = 0.0
    if cfg.prune_remainder and current < target:
        current = ctx.prune_to(target)
        remainder = current - soup_sparsity
    oneshot_top1 = state.evaluate(desc=f"{state.stage_name} before fine-tune")["top1"] if cfg.eval_rounds else None

    t0 = time.perf_counter()
    history = _finetune(ctx, plan.finetune_steps) if plan.finetune_steps > 0 else []
    finetune_s = time.perf_counter() - t0
    if ctx.trainer.step != schedule.total:  # the plan and the steps taken disagree: a bug, not a user error
        raise RuntimeError(f"{state.stage_name}: the main model took {ctx.trainer.step} steps of a {schedule.total}-step schedule")
    final = state.evaluate(desc=f"{state.stage_name} eval")
    total = sum(ctx.images.values())
    report = mask_report(state, cfg.scope)
    state.log.info(f"{state.stage_name}: sparsity {report['scope_sparsity']:.4f} after {len(rounds)} round(s) "
                   f"(+{remainder:.4f} one-shot), top1 {final['top1']:.2f}%, {total} images seen")
    csv_path = write_csv(state.stage_dir / "rounds.csv", rounds, ROUNDS_CSV_FIELDS)
    png = plot_soup_rounds(state.stage_dir / "rounds.png", rounds, target) if rounds else None
    used = ctx.images["learners"] + ctx.images["main"]
    rounds_s = sum(r["round_s"] for r in rounds)
    metrics = {
        "top1": final["top1"], "top5": final["top5"], "eval_images": final["images"],
        "target": target, **provenance, "combine": cfg.combine,
        "input_sparsity": entering, "start": cfg.start, "start_sparsity": start,
        "soup_sparsity": soup_sparsity, "remainder_pruned": remainder,
        "rounds_converged": converged, "n_rounds": len(rounds), "planned_rounds": plan.rounds,
        "resumed_after_round": resumed_after,
        "top1_before_finetune": oneshot_top1, "finetune_steps": plan.finetune_steps,
        "schedule": {"total_steps": schedule.total, "warmup_steps": schedule.warmup, "kind": schedule.kind,
                     "main_steps_per_round": plan.main_steps, "learner_steps": plan.learner_steps,
                     "finetune_steps": plan.finetune_steps, "main_steps_taken": ctx.trainer.step},
        "images_seen": {**ctx.images, "total": total},
        "images_planned": plan.images(),
        "wall_s": {"rounds": rounds_s, "finetune": finetune_s,
                   "learners": sum(r["learners_s"] for r in rounds), "main": sum(r["main_s"] for r in rounds)},
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
