"""Instant Soup Pruning (ISP, Jaiswal et al., ICML 2023) and LOTUS's ISSP: the algorithm's parts.

A soup round trains weak learners (copies of the model) on random fractions of the data, cuts
each learner's mask at the round's goal sparsity (global magnitude, or the scores a criterion
gives the learner, e.g. wanda on its own activations) and merges the masks. How a round
draws and merges masks is a :class:`Combine` strategy, registered by the recipe value of
``instant_soup.combine`` in :data:`COMBINES`:

* ``union`` (ISP), ``intersection``, ``vote`` (strict majority): ``learners`` learners a round,
  each cut at ``step`` of its remaining weights, rounds until the target;
* ``union_levels`` (:class:`LevelsCombine`, LOTUS ISSP as the paper describes it): one learner,
  cut at several sparsity ``levels``, merged by union, one round. Magnitude masks of one weight
  set are nested, so the union is the least sparse level's mask: the round is a measurement.

The run is planned before its first step (:func:`plan_soup`): every round's goal sparsity (an
absolute schedule, so a union that lags behind one round's goal catches up in the next), the
steps and images of every learner, of the main model in every round and of the final fine-tune.
The main model's one learning-rate schedule spans its round steps and the fine-tune's, so its
length must be known in advance.

A round's learners are independent :class:`LearnerJob` s: :func:`train_learner` runs one
anywhere (another process, rank or GPU) from the job alone and returns its masks.

Sparsities are fractions of the weights in scope. The round checkpoint (:func:`save_round`,
:func:`load_round`) is keyed by a fingerprint the caller computes. torch is imported inside the
functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.registry import Registry

ROUND_FILE = "soup_round.safetensors"

# ----------------------------------------------------------------------------- combine strategies


@dataclass(frozen=True)
class Combine:
    """ISP's round: ``learners`` learners, each pruned to the round's goal, masks merged by ``op``.

    Attributes:
        name: the recipe value of ``instant_soup.combine``.
        op: the :mod:`lotus_deploy.masks` set operation that merges the learners' masks
            (``union``, ``intersection`` or ``vote``).
        learners: learners a round (None: the config's ``learners``).
        rounds: rounds in all (None: until the target, at most the config's ``max_rounds``; a
            soup that stops short of the target is warned about).
    """

    name: str
    op: str
    learners: int | None = None
    rounds: int | None = None

    def merge(self, mask_sets: list) -> dict:
        """The round's mask from the learners' mask sets (inputs untouched)."""
        from lotus_deploy import masks

        return getattr(masks, self.op)(*mask_sets)

    def goals(self, current: float, step: float, target: float, levels=None) -> list[float]:
        """Sparsities a learner's masks are cut at in a round starting at ``current``."""
        return [round_target(current, step, target)]

    def learner_masks(self, learner, scope, goals: list[float], existing, scores=None) -> list[dict]:
        """One trained learner's mask sets, one a goal (global ranking; ``existing`` stays removed).

        Args:
            scores: ``learner -> {weight name: score}`` over the scope (wanda); None ranks |w|.
        """
        if scores is None:
            return [prune_masks(learner, scope, goals[0], "global", existing)]
        from lotus_deploy.masks import magnitude_masks

        return [magnitude_masks(scores(learner), goals[0], "global", existing)]

    def label(self, j: int, goal: float) -> str:
        """Name of learner ``j``'s mask at ``goal`` (progress and evaluation labels)."""
        return f"learner {j + 1}"

    def record(self, goals: list[float], sets: list, combined) -> dict:
        """The strategy's fields of a round record (the learners' mask sets, the merged mask)."""
        from lotus_deploy.masks import mask_sparsity

        return {"learner_goal": goals[0], "learner_sparsity": [mask_sparsity(m) for m in sets]}

    def summary(self, rounds: list[dict]) -> dict:
        """The strategy's fields of the stage metrics."""
        return {}


@dataclass(frozen=True)
class LevelsCombine(Combine):
    """LOTUS ISSP: one learner a round, its masks at several sparsity levels merged by ``op``."""

    def goals(self, current: float, step: float, target: float, levels=None) -> list[float]:
        return list(levels or default_levels(current, target))

    def learner_masks(self, learner, scope, goals: list[float], existing, scores=None) -> list[dict]:
        weights = scores(learner) if scores else {k: p.detach() for k, p in learner.named_parameters() if k in existing}
        return level_masks(weights, goals, existing)

    def label(self, j: int, goal: float) -> str:
        return f"level {goal:.3f}"

    def record(self, goals: list[float], sets: list, combined) -> dict:
        from lotus_deploy.masks import mask_sparsity, masks_hash

        least = sets[min(range(len(goals)), key=lambda i: goals[i])]
        return {
            "learner_goal": None, "levels": goals, "level_sparsity": [mask_sparsity(m) for m in sets],
            "union_equals_least_sparse": masks_hash(combined) == masks_hash(least),
        }

    def summary(self, rounds: list[dict]) -> dict:
        if not rounds:
            return {}
        return {"union_equals_least_sparse": rounds[0].get("union_equals_least_sparse"), "level_sparsity": rounds[0].get("level_sparsity")}


COMBINES: Registry[Combine] = Registry("soup combine")
for _c in (Combine("union", "union"), Combine("intersection", "intersection"), Combine("vote", "vote"),
           LevelsCombine("union_levels", "union", learners=1, rounds=1)):
    COMBINES.add(_c.name, _c)
del _c


def combine_masks(mask_sets: list, how: str) -> dict:
    """Merge mask sets: ``union``/``union_levels`` (any keeps), ``intersection`` (all keep), ``vote`` (strict majority)."""
    if how not in COMBINES:
        raise ValueError(f"unknown combine {how!r}; allowed: {', '.join(COMBINES)}")
    return COMBINES[how].merge(mask_sets)


# ----------------------------------------------------------------------------- sparsity schedule and masks


def round_target(current: float, step: float, target: float) -> float:
    """Sparsity after pruning ``step`` of the remaining weights, capped at ``target``."""
    return min(target, current + step * (1.0 - current))


def rounds_needed(current: float, step: float, target: float, within: float, cap: int) -> int:
    """Rounds an ideal soup (every learner agreeing) needs to come within ``within`` of ``target``."""
    n = 0
    while n < cap and target - current > within + 1e-9:
        current = round_target(current, step, target)
        n += 1
    return n


def default_levels(current: float, target: float, n: int = 3) -> list[float]:
    """``n`` levels evenly spaced above ``current`` up to ``target`` (fractions)."""
    return [current + (target - current) * (i + 1) / n for i in range(n)]


def level_masks(weights, levels, existing=None) -> list[dict]:
    """Global magnitude masks of one weight set at each level (nested: higher levels keep less)."""
    from lotus_deploy.masks import magnitude_masks

    return [magnitude_masks(weights, lv, "global", existing) for lv in levels]


def cap_sparsity(combined, weights, target: float, existing=None) -> dict:
    """Give back weights so ``combined`` removes exactly ``round(target * n)`` (for intersection/vote).

    Weights ``combined`` removed come back largest magnitude first; weights ``existing`` removed
    stay removed. The result keeps a superset of ``combined`` (when it is sparser than
    ``target``; otherwise it is returned as the target-sparsity mask of the same ranking).
    """
    from lotus_deploy.masks import magnitude_masks

    gmax = max(float(w.detach().abs().max()) for w in weights.values()) or 1.0
    scores = {  # removed by combined: [0, 1) by magnitude; kept: [1, 2)
        k: w.detach().abs().float() / (gmax * (1 + 1e-6)) + combined[k].to(w.device).float() for k, w in weights.items()
    }
    return magnitude_masks(scores, target, "global", existing)


def scope_masks(model, scope, masks) -> dict:
    """The in-scope masks, all-True for in-scope weights without one (bool, on each weight's device)."""
    import torch

    from lotus_deploy.scope import select_weights

    params = select_weights(model, scope)
    if not params:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    return {
        k: masks[k].to(p.device, torch.bool) if k in masks else torch.ones(p.shape, dtype=torch.bool, device=p.device)
        for k, p in params.items()
    }


def violations(model, masks) -> int:
    """How many weights the masks remove are non-zero in the model (0 when masks are enforced)."""
    params = dict(model.named_parameters())
    return sum(int((params[k].detach().cpu()[~m.cpu()] != 0).sum()) for k, m in masks.items())


# ----------------------------------------------------------------------------- the plan


def fraction_size(n: int, fraction: float) -> int:
    """Images in a ``fraction`` of ``n`` (at least one), as :func:`fraction_indices` draws them."""
    return max(1, int(round(fraction * n)))


def steps_for(images: int, epochs: float, batch_size: int) -> int:
    """Optimizer steps of ``epochs`` over ``images`` images (at least 1; as :func:`lotus_deploy.train.train` counts)."""
    return max(1, int(round(epochs * math.ceil(images / batch_size))))


def images_of_steps(steps: int, batch_size: int, n: int) -> int:
    """Images ``steps`` steps see on a shuffled loader over ``n`` images (each epoch's last batch may be short)."""
    per_epoch = math.ceil(n / batch_size)
    full, rest = divmod(steps, per_epoch)
    return full * n + rest * batch_size


@dataclass(frozen=True)
class SoupPlan:
    """What a soup run will do, fixed before its first step.

    Attributes:
        starts: planned sparsity (fraction of the scope) at the start of each round; a round's
            learners are cut at ``combine.goals(start, ...)``, so the goals form an absolute
            schedule (a union that lags behind one goal catches up in the next round).
        learners: learners a round.
        learner_steps, learner_images: one learner's optimizer steps and images seen.
        main_steps, main_images: the main model's steps and images in one round (0: none).
        finetune_steps, finetune_images: the final fine-tune's.
        reaches_target: the planned rounds come within ``stop_within`` of the target (False: the
            round cap, ``max_rounds`` or ISSP's single round, cut the plan short).
    """

    starts: tuple[float, ...]
    learners: int
    learner_steps: int
    learner_images: int
    main_steps: int
    main_images: int
    finetune_steps: int
    finetune_images: int
    reaches_target: bool = True

    @property
    def rounds(self) -> int:
        return len(self.starts)

    @property
    def main_total_steps(self) -> int:
        """Length of the main model's one schedule: every round's main steps, then the fine-tune's."""
        return self.rounds * self.main_steps + self.finetune_steps

    def images(self) -> dict[str, int]:
        """Images the plan shows the learners, the main model in the rounds and the fine-tune, and their total."""
        out = {"learners": self.rounds * self.learners * self.learner_images, "main": self.rounds * self.main_images,
               "finetune": self.finetune_images}
        return {**out, "total": sum(out.values())}


def plan_soup(cfg, start: float, target: float, n_train: int, batch_size: int, learners: int, max_rounds: int) -> SoupPlan:
    """Plan a soup run from ``start`` to ``target`` (fractions of the scope).

    Args:
        cfg: a resolved :class:`lotus_deploy.recipe.stages.InstantSoup` (``step``,
            ``stop_within``, ``data_fraction``, ``learner_epochs``, ``main_fraction``,
            ``main_epochs``, ``finetune_steps`` / ``finetune_epochs``, ``budget_images``).
        n_train: images in the training subset.
        batch_size: images per step (learners, main model and fine-tune).
        learners: learners a round (the strategy's own count, else ``cfg.learners``).
        max_rounds: cap on the rounds.

    ``budget_images`` gives the fine-tune the whole batches the planned rounds leave of it
    (never past it); otherwise ``finetune_steps``, else ``finetune_epochs`` over the training subset.
    """
    starts, current = [], start
    while len(starts) < max_rounds and target - current > cfg.stop_within + 1e-9:
        starts.append(current)
        current = round_target(current, cfg.step, target)
    k_learner = fraction_size(n_train, cfg.data_fraction)
    learner_steps = steps_for(k_learner, cfg.learner_epochs, batch_size)
    k_main = fraction_size(n_train, cfg.main_fraction)
    main_steps = steps_for(k_main, cfg.main_epochs, batch_size) if cfg.main_epochs > 0 else 0
    plan = SoupPlan(
        starts=tuple(starts), learners=learners,
        learner_steps=learner_steps, learner_images=images_of_steps(learner_steps, batch_size, k_learner),
        main_steps=main_steps, main_images=images_of_steps(main_steps, batch_size, k_main),
        finetune_steps=0, finetune_images=0, reaches_target=target - current <= cfg.stop_within + 1e-9,
    )
    if cfg.budget_images is not None:
        ft = max(0, (cfg.budget_images - plan.images()["total"]) // batch_size)
    elif cfg.finetune_steps is not None:
        ft = cfg.finetune_steps
    else:
        ft = int(round(cfg.finetune_epochs * math.ceil(n_train / batch_size)))
    return replace(plan, finetune_steps=ft, finetune_images=images_of_steps(ft, batch_size, n_train))


# ----------------------------------------------------------------------------- learners


def fraction_batches(data, indices, seed: int, batch_size: int, shard: bool = False) -> Callable[[int], Any]:
    """``epoch -> DataLoader`` over ``data.train[indices]``, shuffled from ``seed`` and the epoch alone.

    Args:
        batch_size: images per step (the global batch in a distributed run).
        shard: in a distributed run (:mod:`lotus_deploy.distributed`), give this rank its share
            of every global batch (for a model trained under DDP): a DistributedSampler drawing
            the same permutation as the one-process loader (``seed * 1009 + epoch``), each rank
            taking every world-size-th image of it (the last few repeated so that every rank
            takes the same steps), ``batch_size / world size`` images per rank. A global batch
            then holds the images of the one-process batch. Without a launch, or False (a
            learner training alone on its rank), every rank gets the whole fraction.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from lotus_deploy import distributed as dist

    ds = Subset(data.train, list(indices))
    if shard and dist.active():
        from lotus_deploy.data import shuffled_loader

        return lambda epoch: shuffled_loader(ds, seed * 1009, batch_size, epoch, data.cfg.workers)

    def make_loader(epoch: int):
        return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=data.cfg.workers,
                          generator=torch.Generator().manual_seed(seed * 1009 + epoch))

    return make_loader


def train_on_fraction(model, data, indices, spec, seed: int, batch_size: int, device, masks=None, log=None, desc="learner") -> int:
    """Train ``model`` in place on ``data.train[indices]`` with masks enforced; returns images seen.

    A fresh AdamW with the spec's schedule (:func:`lotus_deploy.train.train`). Seeds torch
    (augmentation) and the loader's shuffling from ``seed`` alone.
    """
    import torch

    from lotus_deploy.train import train

    batches = fraction_batches(data, indices, seed, batch_size)
    seen = [0]

    def make_loader(epoch: int):
        for batch in batches(epoch):
            seen[0] += len(batch[1])
            yield batch

    torch.manual_seed(seed)
    train(model, spec, make_loader, math.ceil(len(indices) / batch_size), device, masks=masks,
          log=log or (lambda m: None), desc=desc)
    return seen[0]


def learner_spec(cfg, steps: int):
    """A learner's training: ``steps`` steps at the config's peak rates, warmed up linearly from zero over all of them.

    Step ``i`` (0-based) uses ``(i + 1) / steps`` of the peak (:func:`lotus_deploy.train.lr_factor`):
    a learner copied from the main model moves away from it gently instead of jumping at full rate.
    """
    from lotus_deploy.train import TrainSpec

    return TrainSpec(train="all", steps=steps, lr=cfg.lr, backbone_lr=cfg.backbone_lr, weight_decay=cfg.weight_decay,
                     warmup=float(steps), schedule="constant", label_smoothing=cfg.label_smoothing,
                     grad_clip=cfg.grad_clip, eval_every_epoch=False)


@dataclass
class LearnerJob:
    """One weak learner of one soup round: everything it needs, shared with no other job.

    A round's jobs can run in any order, in other processes, on other ranks or GPUs:
    :func:`train_learner` copies ``model`` (the main model as the round starts; not modified),
    trains the copy on the job's own seeded data with a fresh AdamW (``spec``: warm-up from zero),
    cuts its masks and returns them.

    Attributes:
        round, learner: 0-based indices (labels and records).
        seed: seeds its data fraction, shuffling and augmentation; derived from (stage seed,
            round, learner) alone.
        fraction: its share of ``data.train`` (indices drawn from ``seed``).
        spec: its training (:func:`learner_spec`).
        goals: sparsities (fractions of the scope) its masks are cut at.
        combine: the round's strategy (how a learner's masks are cut and labelled).
        scope: the layers pruned.
        model: the main model to copy.
        masks: every mask in force (kept zero while it trains; its in-scope ones stay removed).
        data: the run's data (``data.train``, ``data.cfg.workers``).
        batch_size: images per step.
        device: where it trains.
        scores: ``model -> {weight: score}`` (wanda on the learner's own activations); None ranks |w|.
        evaluate: ``(model, label) -> top-1 %`` of each of its masks; None skips it.
    """

    round: int
    learner: int
    seed: int
    fraction: float
    spec: Any
    goals: list[float]
    combine: Combine
    scope: list[str]
    model: Any
    masks: dict
    data: Any
    batch_size: int
    device: Any
    scores: Callable | None = None
    evaluate: Callable | None = None


@dataclass
class LearnerResult:
    """What one :class:`LearnerJob` gives back (bool masks, numbers: cheap to gather across ranks).

    Attributes:
        masks: one mask set a goal (``{weight name: bool tensor}``).
        images: training images it saw.
        top1: top-1 (%) of each mask on its weights (empty without ``evaluate``).
        violations: masked weights it left non-zero (0 when masks are enforced).
        seconds: wall time of the job.
        rank: the distributed rank that ran it (0 in a one-process run).
    """

    masks: list[dict]
    images: int
    top1: list[float] = field(default_factory=list)
    violations: int = 0
    seconds: float = 0.0
    rank: int = 0

    def to(self, device) -> LearnerResult:
        """The same result with its masks as bool tensors on ``device`` (CPU to gather them across ranks)."""
        import torch

        sets = [{k: m.to(device, torch.bool) for k, m in s.items()} for s in self.masks]
        return replace(self, masks=sets)


def train_learner(job: LearnerJob) -> LearnerResult:
    """Run one learner: copy the main model, train the copy on its data, cut its masks (see :class:`LearnerJob`)."""
    import copy
    import time

    from lotus_deploy.masks import apply_masks_

    t0 = time.perf_counter()
    existing = scope_masks(job.model, job.scope, job.masks)
    learner = copy.deepcopy(job.model)
    idx = fraction_indices(len(job.data.train), job.fraction, job.seed)
    images = train_on_fraction(learner, job.data, idx, job.spec, job.seed, job.batch_size, job.device, masks=job.masks,
                               desc=f"round {job.round + 1} learner {job.learner + 1}")
    bad = violations(learner, job.masks)
    sets = job.combine.learner_masks(learner, job.scope, job.goals, existing, job.scores)
    top1 = []
    if job.evaluate is not None:
        for goal, m in zip(job.goals, sets):
            probe = learner if len(sets) == 1 else copy.deepcopy(learner)
            apply_masks_(probe, m)
            top1.append(job.evaluate(probe, f"round {job.round + 1} {job.combine.label(job.learner, goal)}"))
    return LearnerResult(masks=sets, images=images, top1=top1, violations=bad, seconds=time.perf_counter() - t0)


def strided(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)`` (class-balanced for class-sorted splits)."""
    return sorted({int(i * n // k) for i in range(k)})


def fraction_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of ``range(n)`` (at least one index), sorted."""
    import torch

    k = fraction_size(n, fraction)
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


# ----------------------------------------------------------------------------- round checkpoint


def save_round(path, model, masks, rounds: list[dict], images: dict, fingerprint: str,
               extra_tensors: dict | None = None, extra_meta: dict[str, str] | None = None):
    """Model + masks + round records after a round, atomically (:func:`lotus_deploy.files.save_tensors`).

    Args:
        fingerprint: what the rounds depend on (recipe up to the stage, input masks);
            :func:`load_round` only accepts a checkpoint with the same one.
        extra_tensors, extra_meta: more state to continue from (the main model's optimizer:
            :meth:`lotus_deploy.schedule.ScheduledTrainer.state_tensors`); tensor keys must not
            start with ``model/`` or ``mask/``.
    """
    import json

    from lotus_deploy.files import save_tensors

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask/{k}": v for k, v in masks.items()})
    extra = dict(extra_tensors or {})
    if any(k.startswith(("model/", "mask/")) for k in extra):
        raise ValueError("extra tensor keys must not start with model/ or mask/")
    tensors.update(extra)
    meta = {**(extra_meta or {}), "fingerprint": fingerprint, "round": str(len(rounds)), "rounds": json.dumps(rounds),
            "images": json.dumps(images)}
    return save_tensors(path, tensors, metadata=meta)


@dataclass
class RoundCheckpoint:
    """A round checkpoint read back (:func:`load_round`).

    Attributes:
        model: the model's state dict; masks: the masks in force; rounds: the round records;
        images: images seen so far; extra_tensors, meta: what the caller saved besides
        (``extra_tensors`` keyed as saved; ``meta`` all string metadata).
    """

    model: dict
    masks: dict
    rounds: list[dict]
    images: dict
    extra_tensors: dict
    meta: dict


def load_round(path, fingerprint: str) -> RoundCheckpoint | None:
    """The round checkpoint at ``path`` if it has this fingerprint, else None (also when unreadable)."""
    import json

    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 — unreadable checkpoint: start the stage over
        return None
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    masks = {k[len("mask/"):]: v for k, v in tensors.items() if k.startswith("mask/")}
    extra = {k: v for k, v in tensors.items() if not k.startswith(("model/", "mask/"))}
    return RoundCheckpoint(model, masks, json.loads(meta["rounds"]), json.loads(meta["images"]), extra, dict(meta))
