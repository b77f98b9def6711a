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

Sparsities are fractions of the weights in scope. The round checkpoint (:func:`save_round`,
:func:`load_round`) is keyed by a fingerprint the caller computes. torch is imported inside the
functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- learners' data


def train_on_fraction(model, data, indices, spec, seed: int, batch_size: int, device, masks=None, log=None, desc="learner") -> int:
    """Train ``model`` in place on ``data.train[indices]`` with masks enforced; returns images seen.

    Seeds torch (augmentation) and the loader's shuffling from ``seed`` alone.
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from lotus_deploy.train import train

    ds = Subset(data.train, list(indices))
    seen = [0]

    def make_loader(epoch: int):
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=data.cfg.workers,
                            generator=torch.Generator().manual_seed(seed * 1009 + epoch))
        for batch in loader:
            seen[0] += len(batch[1])
            yield batch

    torch.manual_seed(seed)
    train(model, spec, make_loader, math.ceil(len(ds) / batch_size), device, masks=masks,
          log=log or (lambda m: None), desc=desc)
    return seen[0]


def strided(n: int, k: int) -> list[int]:
    """``k`` indices evenly spread over ``range(n)`` (class-balanced for class-sorted splits)."""
    return sorted({int(i * n // k) for i in range(k)})


def fraction_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` of ``range(n)`` (at least one index), sorted."""
    import torch

    k = max(1, int(round(fraction * n)))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


# ----------------------------------------------------------------------------- round checkpoint


def save_round(path, model, masks, rounds: list[dict], images: dict, fingerprint: str):
    """Model + masks + round records after a round, atomically (:func:`lotus_deploy.files.save_tensors`).

    Args:
        fingerprint: what the rounds depend on (recipe up to the stage, input masks);
            :func:`load_round` only accepts a checkpoint with the same one.
    """
    import json

    from lotus_deploy.files import save_tensors

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask/{k}": v for k, v in masks.items()})
    meta = {"fingerprint": fingerprint, "round": str(len(rounds)), "rounds": json.dumps(rounds), "images": json.dumps(images)}
    return save_tensors(path, tensors, metadata=meta)


def load_round(path, fingerprint: str):
    """(state dict, masks, rounds, images) of a round checkpoint with this fingerprint, else None."""
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
    return model, masks, json.loads(meta["rounds"]), json.loads(meta["images"])
