"""``instant_soup``: Instant Soup Pruning (ISP, Jaiswal et al., ICML 2023) and LOTUS's ISSP ablation.

Each round starts from the current (masked) model. ``learners`` copies each train with a
constant learning rate on their own random ``data_fraction`` of the training subset (own seed),
then prune ``step`` of their remaining in-scope weights by global magnitude. Their masks are
combined (``union``: a weight survives if any learner keeps it; ``intersection``; ``vote``:
strict majority), the combined mask is put on the main model, and the main model trains on a
fraction of the data with it enforced. Rounds stop within ``stop_within`` of the target; the
remainder is pruned one-shot and the model fine-tuned.

``combine: union_levels`` is LOTUS's "Instant Sparse Soup Pruning" as the paper describes it:
one model trained on a fraction of the data, magnitude masks at several sparsity ``levels``,
merged by union (the main model then trains with it as in an ISP round). Magnitude masks of
one weight set are nested (a weight kept at a higher sparsity is kept at every lower one), so
the union is the least sparse level's mask: the soup adds nothing and the sparsity it reaches
is the lowest level's. It runs one round and records that measurement
(``union_equals_least_sparse``, each level's accuracy); the rest of the way to the target is
plain one-shot pruning (or nothing, with ``prune_remainder: false``).

Resumable inside the stage: after every round the model, masks and round records are written
atomically to ``soup_round.safetensors`` in the stage directory; a rerun of the stage with the
same fingerprint (recipe up to this stage and input masks) continues after the last saved round.
Every round and learner is seeded from (stage seed, round, learner) alone, so a resumed run
draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import math

from lotus_deploy.recipe.stages import InstantSoup
from lotus_deploy.registry import register_stage

ROUND_FILE = "soup_round.safetensors"




# ----------------------------------------------------------------------------- pure parts


def combine_masks(mask_sets: list, how: str) -> dict:
    """Merge mask sets: ``union``/``union_levels`` (any keeps), ``intersection`` (all keep), ``vote`` (strict majority)."""
    from lotus_deploy.masks import intersection, union, vote

    ops = {"union": union, "union_levels": union, "intersection": intersection, "vote": vote}
    if how not in ops:
        raise ValueError(f"unknown combine {how!r}; allowed: {', '.join(ops)}")
    return ops[how](*mask_sets)


def round_target(current: float, step: float, target: float) -> float:
    """Sparsity after pruning ``step`` of the remaining weights, capped at ``target``."""
    return min(target, current + step * (1.0 - current))


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


# ----------------------------------------------------------------------------- the stage


class _Ctx:
    """What one soup run carries between rounds (for :func:`play_round`)."""

    def __init__(self, cfg, state, target, base_seed, bs):
        self.cfg, self.state, self.target, self.base_seed, self.bs = cfg, state, target, base_seed, bs
        self.images = {"learners": 0, "main": 0, "finetune": 0}

    def spec(self, epochs: float):
        from lotus_deploy.train import TrainSpec

        c, k = self.cfg, self.cfg.round_lr_scale
        return TrainSpec(train="all", epochs=epochs, lr=k * c.lr, backbone_lr=c.backbone_lr and k * c.backbone_lr, weight_decay=c.weight_decay,
                         warmup=0.0, schedule="constant", label_smoothing=c.label_smoothing, eval_every_epoch=False)

    def evaluate(self, model, desc: str) -> float:
        from torch.utils.data import DataLoader, Subset

        from lotus_deploy.train import evaluate

        data = self.state.data
        ds = data.eval_dataset()
        if self.cfg.eval_images is not None and self.cfg.eval_images < len(ds):
            ds = Subset(ds, strided(len(ds), self.cfg.eval_images))
        bs = data.cfg.eval_batch_size or data.cfg.batch_size
        return evaluate(model, DataLoader(ds, batch_size=bs), self.state.device, desc=desc)["top1"]


def play_round(ctx: _Ctx, r: int, current: float) -> dict:
    """One soup round on ``ctx.state`` (model and masks updated in place); returns its record.

    Args:
        r: round index (0-based); seeds derive from it.
        current: in-scope sparsity before the round.
    """
    import copy

    from lotus_deploy.masks import apply_masks_, mask_sparsity, masks_hash
    from lotus_deploy.progress import bar
    from lotus_deploy.stages.prune import prune_masks

    cfg, state = ctx.cfg, ctx.state
    existing = scope_masks(state.model, cfg.scope, state.masks)
    n_train = len(state.data.train)
    levels_mode = cfg.combine == "union_levels"
    goal = round_target(current, cfg.step, ctx.target)
    levels = (cfg.levels or default_levels(current, ctx.target)) if levels_mode else [goal]
    rec: dict = {"round": r + 1, "start_sparsity": current, "learner_goal": goal if not levels_mode else None,
                 "learner_top1": [], "learner_sparsity": [], "violations": 0}
    sets = []
    n_learners = 1 if levels_mode else cfg.learners
    for j in bar(range(n_learners), desc=f"round {r + 1} learners", unit="learner"):
        seed = ctx.base_seed + 1000 * (r + 1) + j
        learner = copy.deepcopy(state.model)
        idx = fraction_indices(n_train, cfg.data_fraction, seed)
        ctx.images["learners"] += train_on_fraction(
            learner, state.data, idx, ctx.spec(cfg.learner_epochs), seed, ctx.bs, state.device,
            masks=state.masks, log=state.log.debug, desc=f"round {r + 1} learner {j + 1}",
        )
        rec["violations"] += violations(learner, state.masks)
        if levels_mode:
            weights = {k: p.detach() for k, p in learner.named_parameters() if k in existing}
            sets = level_masks(weights, levels, existing)
            rec["levels"] = levels
            rec["level_sparsity"] = [mask_sparsity(m) for m in sets]
            for lv, m in zip(levels, sets):
                if cfg.eval_rounds:
                    probe = copy.deepcopy(learner)
                    apply_masks_(probe, m)
                    rec["learner_top1"].append(ctx.evaluate(probe, f"round {r + 1} level {lv:.3f}"))
                    del probe
        else:
            m = prune_masks(learner, cfg.scope, goal, "global", existing)
            sets.append(m)
            rec["learner_sparsity"].append(mask_sparsity(m))
            if cfg.eval_rounds:
                apply_masks_(learner, m)
                rec["learner_top1"].append(ctx.evaluate(learner, f"round {r + 1} learner {j + 1}"))
        del learner
    combined = combine_masks(sets, cfg.combine)
    if mask_sparsity(combined) > ctx.target + 1e-12:  # intersection / vote can overshoot the target
        rec["capped_from"] = mask_sparsity(combined)
        weights = {k: p.detach() for k, p in state.model.named_parameters() if k in existing}
        combined = cap_sparsity(combined, weights, ctx.target, existing)
    if levels_mode:
        least = sets[min(range(len(levels)), key=lambda i: levels[i])]
        rec["union_equals_least_sparse"] = masks_hash(combined) == masks_hash(least)
    state.masks = {**state.masks, **combined}
    apply_masks_(state.model, state.masks)
    rec["sparsity"] = mask_sparsity(combined)
    rec["combined_masks_hash"] = masks_hash(combined)
    if cfg.eval_rounds:
        rec["combined_top1"] = ctx.evaluate(state.model, f"round {r + 1} combined")
    if cfg.main_epochs > 0:
        seed = ctx.base_seed + 1000 * (r + 1) + 999
        idx = fraction_indices(n_train, cfg.main_fraction or cfg.data_fraction, seed)
        ctx.images["main"] += train_on_fraction(
            state.model, state.data, idx, ctx.spec(cfg.main_epochs), seed, ctx.bs, state.device,
            masks=state.masks, log=state.log.debug, desc=f"round {r + 1} main",
        )
        rec["violations"] += violations(state.model, state.masks)
        if cfg.eval_rounds:
            rec["main_top1"] = ctx.evaluate(state.model, f"round {r + 1} main")
    rec["images_seen"] = dict(ctx.images)
    return rec


def _fingerprint(state) -> str:
    from lotus_deploy.files import sha256_json
    from lotus_deploy.masks import masks_hash
    from lotus_deploy.recipe import stage_fingerprint

    return sha256_json({
        "stage": stage_fingerprint(state.recipe, state.stage_index - 1),
        "input_masks": masks_hash(state.masks) if state.masks else None,
    })


def save_round(path, state, rounds: list[dict], images: dict, fingerprint: str):
    """Model + masks + round records after a round, atomically (``io.save_tensors``)."""
    import json

    from lotus_deploy.files import save_tensors

    tensors = {f"model/{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"mask/{k}": v for k, v in state.masks.items()})
    meta = {"fingerprint": fingerprint, "round": str(len(rounds)), "rounds": json.dumps(rounds), "images": json.dumps(images)}
    return save_tensors(path, tensors, metadata=meta)


def load_round(path, fingerprint: str):
    """(state dict, masks, rounds, images) of a compatible round checkpoint, else None."""
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


@register_stage(InstantSoup)
def instant_soup(cfg: InstantSoup, state):
    import torch

    from lotus_deploy.masks import apply_masks_, mask_sparsity, masks_hash
    from lotus_deploy.plots import plot_soup_rounds
    from lotus_deploy.progress import bar
    from lotus_deploy.stages.prune import mask_report, prune_masks
    from lotus_deploy.stages.sparsity import resolve_sparsity
    from lotus_deploy.state import StageResult
    from lotus_deploy.train import TrainSpec, train

    target, provenance = resolve_sparsity(cfg.sparsity, state, cfg.scope)
    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    ctx = _Ctx(cfg, state, target, state.seed(), bs)
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
    max_rounds = 1 if cfg.combine == "union_levels" else cfg.max_rounds
    est = len(rounds) + _rounds_needed(current, cfg.step, target, cfg.stop_within, max_rounds - len(rounds))
    state.log.info(f"{state.stage_name}: {cfg.combine} soup from sparsity {current:.4f} to {target:.4f} "
                   f"({cfg.learners if cfg.combine != 'union_levels' else 1} learner(s), about {est} round(s))")
    pbar = bar(total=est, initial=len(rounds), desc=f"{state.stage_name} rounds", unit="round")
    while len(rounds) < max_rounds and target - current > cfg.stop_within + 1e-9:
        rec = play_round(ctx, len(rounds), current)
        rounds.append(rec)
        current = rec["sparsity"]
        save_round(path, state, rounds, ctx.images, fingerprint)
        accs = f", learners {['%.1f' % a for a in rec['learner_top1']]}" if rec["learner_top1"] else ""
        state.log.info(f"{state.stage_name} round {rec['round']}: sparsity {current:.4f}{accs}"
                       + (f", combined {rec['combined_top1']:.2f}%" if "combined_top1" in rec else ""))
        pbar.update(1)
        if rec["sparsity"] <= rec["start_sparsity"] + 1e-12 and cfg.combine != "union_levels":
            state.log.warning(f"{state.stage_name}: round {rec['round']} pruned nothing (learners disagree on every weight); stopping the rounds")
            break
    pbar.close()
    converged = target - current <= cfg.stop_within + 1e-9
    if not converged and cfg.combine != "union_levels":
        state.log.warning(f"{state.stage_name}: stopped at sparsity {current:.4f}, {target - current:.4f} short of the target")
    soup_sparsity = current
    remainder = 0.0
    if cfg.prune_remainder and current < target:
        existing = scope_masks(state.model, cfg.scope, state.masks)
        new = prune_masks(state.model, cfg.scope, target, "global", existing)
        state.masks = {**state.masks, **new}
        apply_masks_(state.model, state.masks)
        current = mask_sparsity(new)
        remainder = current - soup_sparsity
    oneshot_top1 = state.evaluate(desc=f"{state.stage_name} before fine-tune")["top1"] if cfg.eval_rounds else None

    # final fine-tune over the training subset, masks enforced
    steps_per_epoch = math.ceil(len(data.train) / bs)
    used = ctx.images["learners"] + ctx.images["main"]
    if cfg.budget_images is not None:
        steps = max(0, (cfg.budget_images - used) // bs)  # never past the budget (short by < one batch)
    elif cfg.finetune_steps is not None:
        steps = cfg.finetune_steps
    else:
        steps = int(round(cfg.finetune_epochs * steps_per_epoch))
    history: list[dict] = []
    if steps > 0:
        seed = ctx.base_seed + 999_999
        seen = [0]

        def make_loader(epoch: int):
            for batch in data.train_loader(seed=seed + epoch, batch_size=bs):
                seen[0] += len(batch[1])
                yield batch

        spec = TrainSpec(train="all", steps=steps, lr=cfg.lr, backbone_lr=cfg.backbone_lr, weight_decay=cfg.weight_decay,
                         warmup=cfg.finetune_warmup, schedule="cosine", label_smoothing=cfg.label_smoothing, eval_every_epoch=False)
        torch.manual_seed(seed)
        history = train(state.model, spec, make_loader, steps_per_epoch, state.device, masks=state.masks,
                        log=state.log.info, desc=f"{state.stage_name} fine-tune")
        ctx.images["finetune"] = seen[0]
    final = state.evaluate(desc=f"{state.stage_name} eval")
    total = sum(ctx.images.values())
    report = mask_report(state, cfg.scope)
    state.log.info(f"{state.stage_name}: sparsity {report['scope_sparsity']:.4f} after {len(rounds)} round(s) "
                   f"(+{remainder:.4f} one-shot), top1 {final['top1']:.2f}%, {total} images seen")
    csv_path = _write_rounds_csv(state.stage_dir / "rounds.csv", rounds)
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
        "violations": sum(r["violations"] for r in rounds) + _violations_now(state),
        "rounds": rounds, "finetune_history": history, **report,
        "final_masks_hash": masks_hash(state.masks),
    }
    if cfg.combine == "union_levels" and rounds:
        metrics["union_equals_least_sparse"] = rounds[0].get("union_equals_least_sparse")
        metrics["level_sparsity"] = rounds[0].get("level_sparsity")
    if path.exists():
        path.unlink()  # the stage's own checkpoint replaces it
    arts = {"rounds_csv": csv_path}
    if png is not None:
        arts["rounds_png"] = png
    return StageResult(metrics=metrics, artifacts=arts)


def _violations_now(state) -> int:
    return violations(state.model, state.masks)


def _rounds_needed(current: float, step: float, target: float, within: float, cap: int) -> int:
    """Rounds an ideal soup (every learner agreeing) needs to come within ``within`` of ``target``."""
    n = 0
    while n < cap and target - current > within + 1e-9:
        current = round_target(current, step, target)
        n += 1
    return n


def _write_rounds_csv(path, rounds: list[dict]):
    from lotus_deploy.files import write_csv

    return write_csv(path, rounds, ["round", "start_sparsity", "learner_goal", "sparsity", "combined_top1", "main_top1", "learner_top1",
                                    "learner_sparsity", "levels", "level_sparsity", "violations", "combined_masks_hash"])
