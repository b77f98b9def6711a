"""``lottery_finetune``: fine-tune on data lottery tickets with physical token dropping.

A teacher (the model entering the stage, or a named variant of the run) scores every patch of
every training image once (CLS attention, see :mod:`lotus_deploy.prune.tickets`); the scores are
cached in ``RUN/tickets/`` under a hash of the teacher weights, data, subset and transform, so a
resumed run reuses them. The model then trains on the K best patches per image (plus
CLS/registers): the transformer really runs on fewer tokens. ``selection`` names a registered
strategy (:data:`lotus_deploy.prune.tickets.SELECTIONS`: attention, or the random and full
controls); K is resolved once from ``keep`` and passed on as an integer. Masks of earlier pruning stages stay enforced.
Evaluation uses all patches; ``eval_tokens: ticket`` also evaluates on teacher-selected patches.

Augmentation: cached scores belong to patch positions of the un-augmented image, so with
``scoring: cached`` the stage trains on un-augmented images (random crop/flip would move content
under the scores); the reason is logged and written to the manifest. ``scoring: online`` lets
the teacher score each (augmented) batch during training instead.
"""

from __future__ import annotations

import math

from lotus_deploy.recipe.stages import LotteryFinetune
from lotus_deploy.registry import register_stage
from lotus_deploy.stages.common import (
    early_bird_watch,
    finish_early_bird,
    load_variant,
    run_training,
    train_settings,
    write_history,
)

AUGMENT_NOTE = (
    "augmentation disabled: cached ticket scores belong to the patch positions of the un-augmented "
    "image, and random crop/flip would misalign scores and patches (use scoring: online to augment)"
)

# ----------------------------------------------------------------------------- helpers


def _teacher(cfg: LotteryFinetune, state):
    """(teacher model, its name): a named variant of the run, or None for the model entering."""
    if cfg.teacher is None:
        return None, "entering"
    return load_variant(state, cfg.teacher, "teacher")[0], cfg.teacher


def _plain_train(state):
    """The training subset without augmentation (same images, same order as ``state.data.train``)."""
    from lotus_deploy.data import build_data

    d = state.data
    if d.cfg.augment == "none":
        return d.train
    plain = build_data(d.cfg.model_copy(update={"augment": "none"}), d.spec)
    assert plain.subsets["train"] == d.subsets["train"], "un-augmented subset differs"
    return plain.train


def score_info(state, teacher, split: str, block_ids: list[int]) -> dict:
    """What ticket scores depend on (hashed into the cache file name)."""
    from lotus_deploy.data import build_transform
    from lotus_deploy.files import sha256_json
    from lotus_deploy.prune.tickets import weights_hash

    d = state.data
    keep = ("kind", "root", "train_subset", "eval_subset", "subset_seed")
    return {
        "version": 1,
        "split": split,
        "teacher": weights_hash(teacher),
        "model": state.recipe.model.model_dump(mode="json"),
        "data": {k: v for k, v in d.cfg.model_dump(mode="json").items() if k in keep},
        "indices": sha256_json(d.subsets.get(split)),
        "images": len(d.train if split == "train" else d.eval),
        "transform": repr(build_transform(d.spec, train=False)),
        "blocks": block_ids,
    }


def _scores(cfg, state, teacher, dataset, split: str, block_ids: list[int]):
    """(sink -> (n, P) scores, source, path, seconds) through the run's cache."""
    import time

    from lotus_deploy.prune.tickets import cached_scores, score_dataset

    d = state.data
    bs = cfg.score_batch_size or d.cfg.eval_batch_size or d.cfg.batch_size
    t0 = time.perf_counter()
    scores, source, path = cached_scores(
        state.run_dir / "tickets", split, score_info(state, teacher, split, block_ids),
        lambda: score_dataset(teacher, dataset, block_ids, state.device, bs, d.cfg.workers, desc=f"{state.stage_name} scores ({split})"),
    )
    seconds = time.perf_counter() - t0
    state.log.info(f"{state.stage_name}: {split} ticket scores {source} ({tuple(scores[cfg.sink].shape)}, {seconds:.1f} s) {path.name}")
    return scores, source, path, seconds


class OnlineForward:
    """``forward(x, extra)`` that lets a frozen teacher pick each batch's K tickets (augmentation allowed)."""

    def __init__(self, cfg, model, teacher, block_ids, patches: int, k: int, seed: int):
        import torch

        from lotus_deploy.prune.tickets import SELECTIONS

        self.cfg, self.model, self.teacher, self.block_ids, self.patches, self.k = cfg, model, teacher, block_ids, patches, k
        self.selection = SELECTIONS[cfg.selection]
        self.g = torch.Generator().manual_seed(seed)

    def idx(self, x):
        """Kept patch indices (B, K) of the batch ``x`` (B, 3, H, W), on ``x``'s device."""
        from lotus_deploy.prune.tickets import cls_attention, patch_scores

        scores = None
        if self.selection.needs_teacher:
            rows = cls_attention(self.teacher, x, self.block_ids)  # (B, L, H, N)
            scores = patch_scores(rows, self.teacher.num_prefix_tokens, self.cfg.sink)  # (B, P)
        return self.selection.pick(scores, x.shape[0], self.patches, self.k, self.g).to(x.device)

    def __call__(self, x, extra=None):
        from lotus_deploy.prune.tickets import forward_tokens

        return forward_tokens(self.model, x, self.idx(x) if extra is None else extra)


def _eval_on_tickets(state, table):
    """Eval metrics with the model run on each eval image's ticket (table rows in eval order)."""
    from torch.utils.data import DataLoader

    from lotus_deploy.prune.tickets import TicketDataset, forward_tokens
    from lotus_deploy.train import evaluate

    d = state.data
    loader = DataLoader(TicketDataset(d.eval_dataset(), table), batch_size=d.cfg.eval_batch_size or d.cfg.batch_size, shuffle=False)
    r = evaluate(state.model, loader, state.device, forward=lambda x, idx: forward_tokens(state.model, x, idx), desc="ticket eval")
    return {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"]}


def show_indices(n_images: int, show: int) -> list[int]:
    """``show`` evenly spaced image indices (class-sorted subsets give varied classes)."""
    import torch

    show = min(show, n_images)
    return torch.linspace(0, n_images - 1, show).round().long().tolist() if show else []


def ticket_figure(cfg: LotteryFinetune, teacher, dataset, state, seed: int, path, show: int, k: int, table=None):
    """tickets.png: ``show`` training images above their tickets (dropped patches grey).

    Args:
        k: K, patches kept per image.
        table: the stage's (n, K) ticket table for ``dataset`` (epoch 1); None recomputes the
            shown images' tickets with ``teacher`` (or the seed for random selection).
    """
    import torch

    from lotus_deploy.prune.tickets import (
        SELECTIONS,
        denormalize,
        num_patches,
        resolve_blocks,
        save_ticket_grid,
        score_images,
        select_tickets,
    )

    model = teacher if teacher is not None else state.model
    picks = show_indices(len(dataset), show)
    items = [dataset[i] for i in picks]
    x = torch.stack([it[0] for it in items])  # (S, 3, H, W)
    P = num_patches(model)
    if table is not None:
        idx = table[picks]
    elif SELECTIONS[cfg.selection].needs_teacher:
        was = model.training
        model.eval()
        s = score_images(model, x.to(state.device), resolve_blocks(model, cfg.blocks), sinks=[cfg.sink])[cfg.sink].cpu()
        model.train(was)
        idx = select_tickets(s, len(picks), P, k, cfg.selection)
    else:
        idx = select_tickets(None, len(dataset), P, k, cfg.selection, seed, 0)[picks]
    classes = state.data.classes
    labels = [classes[int(it[1])] if int(it[1]) < len(classes) else str(int(it[1])) for it in items]
    spec = state.data.spec
    title = f"{state.stage_name}: {cfg.selection} tickets, keep {idx.shape[1]}/{P} patches ({cfg.sink})"
    return save_ticket_grid(denormalize(x, spec.mean, spec.std), idx, tuple(model.patch_embed.grid_size), path, title, labels)


# ----------------------------------------------------------------------------- the stage


@register_stage(LotteryFinetune)
def lottery_finetune(cfg: LotteryFinetune, state):
    import copy

    import torch
    from torch.utils.data import DataLoader

    from lotus_deploy.prune.tickets import (
        SELECTIONS,
        TicketDataset,
        check_token_model,
        forward_tokens,
        num_kept,
        num_patches,
        resolve_blocks,
        save_curves,
        select_tickets,
        ticket_overlap,
    )
    from lotus_deploy.state import StageResult

    cfg = train_settings(cfg, state)
    model = state.model
    check_token_model(model)
    sel = SELECTIONS[cfg.selection]
    P, npre = num_patches(model), int(model.num_prefix_tokens)
    K = num_kept(P, cfg.keep_ratio)  # resolved once (P for selection: full); every ticket table has K columns
    seed = state.seed()
    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    named, teacher_name = _teacher(cfg, state)
    needs_teacher = sel.needs_teacher or cfg.eval_tokens == "ticket"
    block_ids = resolve_blocks(named if named is not None else model, cfg.blocks) if needs_teacher else []
    metrics: dict = {
        "selection": cfg.selection, "keep": K / P, "kept_patches": K, "patches": P, "prefix_tokens": npre,
        "token_fraction": (npre + K) / (npre + P), "blocks": block_ids, "sink": cfg.sink, "teacher": teacher_name,
        "scoring": cfg.scoring,
    }
    arts = {}

    # Eval tickets first: the teacher is still the model entering the stage.
    teacher = named if named is not None else model
    eval_table = None
    if cfg.eval_tokens == "ticket":
        ev = data.eval_dataset()
        es = None
        if sel.needs_teacher:
            es, _, _, _ = _scores(cfg, state, teacher, ev, "eval", block_ids)
            es = es[cfg.sink]
        eval_table = select_tickets(es, len(ev), P, K, cfg.selection, seed + 7, 0)

    table0 = None
    if cfg.scoring == "cached":
        train_ds = _plain_train(state)
        if data.cfg.augment != "none":
            state.log.info(f"{state.stage_name}: {AUGMENT_NOTE}")
            metrics["augment"], metrics["augment_note"] = "none", AUGMENT_NOTE
        else:
            metrics["augment"] = "none"
        scores = None
        metrics["scores_source"] = "none"
        if sel.needs_teacher:
            all_scores, source, path, secs = _scores(cfg, state, teacher, train_ds, "train", block_ids)
            scores = all_scores[cfg.sink]
            metrics.update(scores_source=source, scores_file=str(path.relative_to(state.run_dir)), score_seconds=secs)
            ov = ticket_overlap(*(select_tickets(all_scores[s], len(train_ds), P, K, cfg.selection) for s in ("normalize", "exclude")))
            metrics["sink_shared"], metrics["sink_images_changed"] = ov["shared"], ov["images_changed"]
            state.log.info(
                f"{state.stage_name}: sink normalize vs exclude: {100 * ov['shared']:.1f}% of kept patches shared, "
                f"{100 * ov['images_changed']:.1f}% of images get a different ticket"
            )

        def table(epoch: int):
            return select_tickets(scores, len(train_ds), P, K, cfg.selection, seed, epoch)

        table0 = table(0)
        if sel.needs_teacher:  # how far the teacher's tickets are from a random control's
            rnd = select_tickets(None, len(train_ds), P, K, "random", seed, 0)
            metrics["random_shared"] = ticket_overlap(table0, rnd)["shared"]

        def make_loader(epoch: int):
            t = table(epoch) if epoch > 0 and sel.redraws else table0
            return DataLoader(
                TicketDataset(train_ds, t), batch_size=bs, shuffle=True,
                generator=torch.Generator().manual_seed(seed + 1 + epoch), num_workers=data.cfg.workers,
            )

        steps_per_epoch = math.ceil(len(train_ds) / bs)

        def forward(x, idx):
            return forward_tokens(model, x, idx)
    else:
        train_ds = data.train
        metrics["augment"] = data.cfg.augment
        frozen = teacher
        if sel.needs_teacher and named is None:
            frozen = copy.deepcopy(model).eval()
            for p in frozen.parameters():
                p.requires_grad_(False)
        forward = OnlineForward(cfg, model, frozen, block_ids, P, K, seed)
        make_loader, steps_per_epoch = None, None
        metrics["scores_source"] = "online"

    if cfg.show:
        fig_teacher = named if named is not None else (frozen if cfg.scoring == "online" else model)
        arts["tickets_png"] = ticket_figure(cfg, fig_teacher, train_ds if cfg.scoring == "cached" else _plain_train(state), state, seed, state.stage_dir / "tickets.png", cfg.show, K, table=table0)

    if cfg.scoring == "cached":
        named = teacher = None  # every score is computed: free a named teacher before training
    watch = early_bird_watch(cfg, state) if cfg.early_bird is not None else None
    hooks = watch.hooks() if watch is not None else {}
    early_bird_epoch = hooks.pop("on_epoch", None)

    def on_epoch(epoch: int, rec: dict) -> bool:
        if eval_table is not None and "eval_top1" in rec:
            rec.update({f"eval_ticket_{k}": v for k, v in _eval_on_tickets(state, eval_table).items()})
            state.log.info(f"{state.stage_name} epoch {epoch}: eval on tickets {rec['eval_ticket_top1']:.2f}%")
        return bool(early_bird_epoch(epoch, rec)) if early_bird_epoch is not None else False

    state.log.info(
        f"{state.stage_name}: {cfg.selection} tickets, {K}/{P} patches + {npre} prefix tokens "
        f"({100 * metrics['token_fraction']:.0f}% of tokens), scoring {cfg.scoring}"
    )
    history, final = run_training(
        cfg, state, forward=forward, make_loader=make_loader, steps_per_epoch=steps_per_epoch, metrics=metrics, on_epoch=on_epoch, **hooks
    )
    arts["history"] = write_history(state, history)
    arts["curves_png"] = save_curves(history, state.stage_dir / "curves.png", f"{state.stage_name}: {cfg.selection}, keep {K}/{P} patches")
    metrics.update(
        top1=final["top1"], top5=final["top5"], eval_loss=final["loss"],
        train_seconds=sum(h["seconds"] for h in history), history=history,
    )
    if "ticket_top1" in final:
        metrics.update(ticket_top1=final["ticket_top1"], ticket_top5=final["ticket_top5"], ticket_eval_loss=final["ticket_loss"])
    if watch is not None:
        finish_early_bird(watch, state, history, metrics, arts)
    return StageResult(metrics=metrics, artifacts=arts)


# ----------------------------------------------------------------------------- lotus tickets RUN --show N


def show_run_tickets(run_dir, show: int, out=None, stage: str | None = None):
    """Write the ticket grid of a run's ``lottery_finetune`` stage; returns the PNG path.

    The teacher is the stage's named teacher or the checkpoint entering the stage (the latest
    finished one before it); random tickets use the stage's seed (epoch 1's tickets).

    Raises:
        RunError: the recipe has no such stage.
    """
    from pathlib import Path

    from lotus_deploy.errors import RunError
    from lotus_deploy.prune.tickets import num_kept, num_patches
    from lotus_deploy.run import Run, checkpoint_entry, load_checkpoint
    from lotus_deploy.state import RunState

    run = Run(run_dir)
    found = [(i, s) for i, s in enumerate(run.recipe.stages) if s.kind == "lottery_finetune" and (stage is None or s.name == stage)]
    if not found:
        what = f"no lottery_finetune stage named {stage!r}" if stage else "no lottery_finetune stage"
        raise RunError(f"{run.dir}: recipe has {what}")
    i, cfg = found[-1]
    state = RunState.from_run(run, "initial", quiet=True)
    state.stage_index, state.stage_name = i + 1, cfg.name
    if cfg.teacher is None:
        load_checkpoint(run.dir, checkpoint_entry(run.manifest, i - 1), state.model, state.device)
        teacher = state.model
    else:
        teacher, _ = _teacher(cfg, state)
    seed = state.seed()
    out = Path(out) if out is not None else run.dir / "stages" / f"{i + 1:02d}_{cfg.name}" / f"tickets-{show}.png"
    ds = _plain_train(state)
    k = num_kept(num_patches(teacher), cfg.keep_ratio)
    return ticket_figure(cfg, teacher.eval(), ds, state, seed, out, show, k)
