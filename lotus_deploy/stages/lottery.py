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

Hierarchical dropping (``drop_at: [3, 6, 9]``, Data-LTH / EViT): the tokens entering each
listed block are cut to ``keep`` of those that reached it, by the CLS attention of the block
before it. ``teacher: self`` chooses inside the student's own forward (online); a frozen teacher
(a variant of this run or of ``teacher_run``, or the model entering) runs the same hierarchical
forward and hands its nested tickets to the student, per batch (online) or once (cached).
Evaluation on tickets uses the teacher's tickets of the eval images (the student's own for
``teacher: self``, random nested tickets with a fixed seed for ``selection: random``).

Distributed (``torchrun``, :mod:`lotus_deploy.distributed`): cached scoring spreads the
teacher's batches over the ranks and gathers the tables in dataset order on every rank; rank 0
alone reads and writes the cache (:func:`lotus_deploy.prune.tickets.cached_scores`). The
student trains under DDP on this rank's share of every global batch (the cached-mode ticket
loader is sharded like :meth:`lotus_deploy.data.DataBundle.train_loader`; online, each rank's
teacher scores its own share, random draws seeded per rank); evaluations on tickets are
sharded with the counts summed, so every eval image counts once.
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
    """(frozen teacher model, its name); None for the model entering (``entering``) or the student itself (``self``)."""
    if cfg.teacher is None:
        return None, "entering"
    if cfg.teacher == "self":
        return None, "self"
    if cfg.teacher_run is not None:
        return _run_teacher(cfg, state), f"{cfg.teacher_run}:{cfg.teacher}"
    return load_variant(state, cfg.teacher, "teacher")[0], cfg.teacher


def _run_teacher(cfg: LotteryFinetune, state):
    """The ``teacher`` variant of another finished run (``teacher_run``), frozen, on the state's device.

    Raises:
        RunError: no such run or variant, or its patch grid differs from the student's.
    """
    from lotus_deploy.errors import RunError
    from lotus_deploy.run import Run

    model, _ = Run(cfg.teacher_run).load(cfg.teacher, device=str(state.device))
    grid, want = tuple(model.patch_embed.grid_size), tuple(state.model.patch_embed.grid_size)
    if grid != want:
        raise RunError(f"{state.stage_name}: teacher {cfg.teacher_run}:{cfg.teacher} has a {grid} patch grid, the student {want}")
    return model.eval().requires_grad_(False)


def _plain_train(state):
    """The training subset without augmentation (same images, same order as ``state.data.train``)."""
    from lotus_deploy.data import build_data

    d = state.data
    if d.cfg.augment == "none":
        return d.train
    plain = build_data(d.cfg.model_copy(update={"augment": "none"}), d.spec)
    assert plain.subsets["train"] == d.subsets["train"], "un-augmented subset differs"
    return plain.train


def score_info(state, teacher, split: str, block_ids: list[int], extra: dict | None = None) -> dict:
    """What ticket scores depend on (hashed into the cache file name); ``extra`` adds keys (a drop plan)."""
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
        **(extra or {}),
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


class _TeacherClock:
    """Seconds spent choosing tickets outside the student's forward (a frozen teacher's pass or scoring pass)."""

    seconds = 0.0

    def timed(self, fn, x):
        """``fn(x)``, its wall time (CUDA synchronized) added to :attr:`seconds`."""
        import time

        import torch

        t0 = time.perf_counter()
        out = fn(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.seconds += time.perf_counter() - t0
        return out

    def take(self) -> float:
        """Seconds since the last call (per-epoch teacher time)."""
        s, self.seconds = self.seconds, 0.0
        return s


class OnlineForward(_TeacherClock):
    """``forward(x, extra)`` that lets a teacher pick each batch's K input-level tickets (augmentation allowed).

    The teacher is frozen, or the student itself (``teacher: self``: a no-grad scoring pass of
    the student's current weights before its token-dropped forward).
    """

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
            rows = self.timed(lambda x_: cls_attention(self.teacher, x_, self.block_ids), x)  # (B, L, H, N)
            scores = patch_scores(rows, self.teacher.num_prefix_tokens, self.cfg.sink)  # (B, P)
        return self.selection.pick(scores, x.shape[0], self.patches, self.k, self.g).to(x.device)

    def __call__(self, x, extra=None):
        from lotus_deploy.prune.tickets import forward_tokens

        return forward_tokens(self.model, x, self.idx(x) if extra is None else extra)


class PlanForward(_TeacherClock):
    """``forward(x, extra)`` of hierarchical dropping (:class:`~lotus_deploy.prune.tickets.DropPlan`).

    ``extra`` (cached tickets, (B, sum K_i)) wins; else the student chooses in its own forward
    (``teacher`` is the student, or ``selection: random``), or a frozen teacher's nested
    tickets of the batch decide.
    """

    def __init__(self, cfg, model, teacher, plan, seed: int):
        import torch

        self.cfg, self.model, self.teacher, self.plan = cfg, model, teacher, plan
        self.g = torch.Generator().manual_seed(seed)

    def tickets(self, x):
        """The nested tickets a batch ``x`` (B, 3, H, W) gets: one (B, K_i) per location (None: the student chooses)."""
        from lotus_deploy.prune.tickets import hierarchical_tickets

        if self.cfg.selection == "random" or self.teacher is None or self.teacher is self.model:
            return None
        return self.timed(lambda x_: hierarchical_tickets(self.teacher, x_, self.plan, self.cfg.sink), x)

    def __call__(self, x, extra=None):
        from lotus_deploy.prune import tickets as T

        tickets = self.plan.split(extra) if extra is not None else self.tickets(x)
        return T.forward_tokens_dropping(self.model, x, self.plan, tickets, selection=self.cfg.selection, sink=self.cfg.sink, generator=self.g)


def _plan_tables(cfg, state, teacher, dataset, split: str, plan):
    """(teacher's nested tickets of ``dataset``, (n, sum K_i), seconds) through the run's cache."""
    import time

    from lotus_deploy.prune.tickets import (
        cached_scores,
        hierarchical_dataset,
        plan_tables,
    )

    d = state.data
    bs = cfg.score_batch_size or d.cfg.eval_batch_size or d.cfg.batch_size
    t0 = time.perf_counter()
    extra = {"drop_at": list(plan.at), "kept": list(plan.kept), "sink": cfg.sink, "kind": "hierarchical"}
    tables, source, path = cached_scores(
        state.run_dir / "tickets", split, score_info(state, teacher, split, plan.scoring_blocks, extra),
        lambda: hierarchical_dataset(teacher, dataset, plan, state.device, cfg.sink, bs, d.cfg.workers, desc=f"{state.stage_name} tickets ({split})"),
    )
    seconds = time.perf_counter() - t0
    state.log.info(f"{state.stage_name}: {split} hierarchical tickets {source} (K per location {plan.kept}, {seconds:.1f} s) {path.name}")
    return plan_tables(tables, plan), source, path, seconds


def _eval_on_tickets(state, table, forward=None):
    """Eval metrics with the model run on each eval image's ticket (table rows in eval order).

    Args:
        table: (n, K) kept patches per eval image, or (n, sum K_i) nested tickets for ``forward``;
            None: ``forward(x)`` chooses the tickets itself (``teacher: self``).
        forward: ``(x, idx) -> logits``; default :func:`~lotus_deploy.prune.tickets.forward_tokens`.
    """
    from torch.utils.data import DataLoader

    from lotus_deploy.prune.tickets import TicketDataset, forward_tokens
    from lotus_deploy.train import evaluate

    d = state.data
    ds = d.eval_dataset() if table is None else TicketDataset(d.eval_dataset(), table)
    loader = DataLoader(ds, batch_size=d.cfg.eval_batch_size or d.cfg.batch_size, shuffle=False)
    fwd = forward or (lambda x, idx: forward_tokens(state.model, x, idx))
    r = evaluate(state.model, loader, state.device, forward=fwd, desc="ticket eval")  # distributed: sharded, counts summed
    return {"top1": r["top1"], "top5": r["top5"], "loss": r["loss"], "images": r["images"]}


def _rank_seed(seed: int) -> int:
    """``seed`` for rank 0 and in one process; another seed on each other rank (its own random tickets online)."""
    from lotus_deploy import distributed as dist

    return seed + 1_000_003 * dist.rank()


def show_indices(n_images: int, show: int) -> list[int]:
    """``show`` evenly spaced image indices (class-sorted subsets give varied classes)."""
    import torch

    show = min(show, n_images)
    return torch.linspace(0, n_images - 1, show).round().long().tolist() if show else []


def ticket_figure(cfg: LotteryFinetune, teacher, dataset, state, seed: int, path, show: int, k: int, table=None, plan=None):
    """tickets.png: ``show`` training images above their tickets (dropped patches grey).

    Args:
        k: K, patches kept per image (with ``plan``: reaching the last location).
        table: the stage's (n, K) ticket table for ``dataset`` (epoch 1; with ``plan``, the last
            location's); None recomputes the shown images' tickets with ``teacher`` (or the
            seed for random selection).
        plan: hierarchical dropping (:class:`~lotus_deploy.prune.tickets.DropPlan`): the figure
            shows the patches that reach the last location.
    """
    import torch

    from lotus_deploy.prune.tickets import (
        SELECTIONS,
        denormalize,
        hierarchical_tickets,
        num_patches,
        random_nested_tickets,
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
    was = model.training
    model.eval()
    if table is not None:
        idx = table[picks]
    elif plan is not None and SELECTIONS[cfg.selection].needs_teacher:
        idx = hierarchical_tickets(model, x.to(state.device), plan, cfg.sink)[-1].cpu()
    elif plan is not None:
        idx = random_nested_tickets(len(dataset), plan, seed, 0)[-1][picks]
    elif SELECTIONS[cfg.selection].needs_teacher:
        s = score_images(model, x.to(state.device), resolve_blocks(model, cfg.blocks), sinks=[cfg.sink])[cfg.sink].cpu()
        idx = select_tickets(s, len(picks), P, k, cfg.selection)
    else:
        idx = select_tickets(None, len(dataset), P, k, cfg.selection, seed, 0)[picks]
    model.train(was)
    classes = state.data.classes
    labels = [classes[int(it[1])] if int(it[1]) < len(classes) else str(int(it[1])) for it in items]
    spec = state.data.spec
    where = f" reaching block {plan.at[-1]} (drops before blocks {list(plan.at)})" if plan is not None else ""
    title = f"{state.stage_name}: {cfg.selection} tickets, keep {idx.shape[1]}/{P} patches{where} ({cfg.sink})"
    return save_ticket_grid(denormalize(x, spec.mean, spec.std), idx, tuple(model.patch_embed.grid_size), path, title, labels)


# ----------------------------------------------------------------------------- the stage


def _frozen_copy(model):
    """A frozen eval-mode copy of ``model`` (the entering model as an online teacher)."""
    import copy

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _sink_report(cfg, state, all_scores, n: int, P: int, K: int, metrics: dict) -> None:
    """How far normalize and exclude tickets differ on the training set (input-level, cached)."""
    from lotus_deploy.prune.tickets import select_tickets, ticket_overlap

    ov = ticket_overlap(*(select_tickets(all_scores[s], n, P, K, cfg.selection) for s in ("normalize", "exclude")))
    metrics["sink_shared"], metrics["sink_images_changed"] = ov["shared"], ov["images_changed"]
    state.log.info(
        f"{state.stage_name}: sink normalize vs exclude: {100 * ov['shared']:.1f}% of kept patches shared, "
        f"{100 * ov['images_changed']:.1f}% of images get a different ticket"
    )


class _Layout:
    """What one stage drops: input-level K patches, or a hierarchical :class:`DropPlan`.

    Gives every code path of the stage the same four operations: the forward on given tickets,
    the teacher's ticket table of a dataset, a random (seeded) table and the online forward.
    """

    def __init__(self, cfg, state, model, teacher_for_blocks):
        from lotus_deploy.prune.tickets import (
            drop_plan,
            num_kept,
            num_patches,
            resolve_blocks,
        )

        self.cfg, self.state = cfg, state
        self.P, self.npre = num_patches(model), int(model.num_prefix_tokens)
        self.plan = drop_plan(model, cfg.drop_at, cfg.location_keeps) if cfg.drop_at is not None else None
        if self.plan is None:
            self.K = num_kept(self.P, cfg.keep_ratio)  # resolved once (P for selection: full); every ticket table has K columns
            self.block_ids = resolve_blocks(teacher_for_blocks, cfg.blocks)
        else:
            self.K = self.plan.kept[-1]
            self.block_ids = self.plan.scoring_blocks

    def metrics(self, depth: int) -> dict:
        """The stage metrics describing what is dropped (``token_fraction``: mean over blocks)."""
        out = {"keep": self.K / self.P, "kept_patches": self.K, "patches": self.P, "prefix_tokens": self.npre, "blocks": self.block_ids}
        if self.plan is None:
            out["token_fraction"] = (self.npre + self.K) / (self.npre + self.P)
            return out
        tokens = self.plan.tokens_per_block(depth, self.npre)
        out.update(drop_at=list(self.plan.at), kept_per_location=list(self.plan.kept), keep_per_location=self.cfg.location_keeps,
                   tokens_per_block=tokens, token_fraction=sum(tokens) / (depth * (self.npre + self.P)))
        return out

    def forward(self, model):
        """``(x, idx) -> logits`` on given tickets ((B, K) or nested (B, sum K_i))."""
        from lotus_deploy.prune import tickets as T

        if self.plan is None:
            return lambda x, idx: T.forward_tokens(model, x, idx)
        return lambda x, idx: T.forward_tokens_dropping(model, x, self.plan, self.plan.split(idx))

    def random_table(self, n: int, seed: int, epoch: int, selection: str | None = None):
        """Seeded tickets of ``n`` images for ``selection`` (default the stage's) random or full: (n, K) or (n, sum K_i)."""
        import torch

        from lotus_deploy.prune.tickets import random_nested_tickets, select_tickets

        if self.plan is None:
            return select_tickets(None, n, self.P, self.K, selection or self.cfg.selection, seed, epoch)
        return torch.cat(random_nested_tickets(n, self.plan, seed, epoch), dim=1)

    def teacher_table(self, teacher, dataset, split: str, metrics: dict | None = None):
        """The teacher's attention tickets of ``dataset`` through the run's cache; records the scoring in ``metrics``."""
        from lotus_deploy.prune.tickets import select_tickets

        cfg, state = self.cfg, self.state
        if self.plan is not None:
            table, source, path, secs = _plan_tables(cfg, state, teacher, dataset, split, self.plan)
        else:
            all_scores, source, path, secs = _scores(cfg, state, teacher, dataset, split, self.block_ids)
            table = select_tickets(all_scores[cfg.sink], len(dataset), self.P, self.K, cfg.selection)
            if metrics is not None:
                _sink_report(cfg, state, all_scores, len(dataset), self.P, self.K, metrics)
        if metrics is not None:
            metrics.update(scores_source=source, scores_file=str(path.relative_to(state.run_dir)), score_seconds=secs)
        return table

    def online(self, model, teacher, seed: int):
        """``(x, extra=None) -> logits`` choosing each batch's tickets during training (teacher: frozen, or the student)."""
        if self.plan is None:
            return OnlineForward(self.cfg, model, teacher, self.block_ids, self.P, self.K, seed)
        return PlanForward(self.cfg, model, teacher, self.plan, seed)

    def last(self, table):
        """The tickets reaching the last location (the whole table for input-level tickets)."""
        return table if self.plan is None else self.plan.split(table)[-1]


def _eval_tickets(cfg, state, layout, teacher, seed: int):
    """``() -> metrics`` evaluating on tickets of the eval images, or None (``eval_tokens: all``).

    Attention: the frozen teacher's tickets, computed once (the student's own online choice
    with ``teacher: self``); random: seeded random tickets, fixed for the stage; full: every patch.
    """
    if cfg.eval_tokens != "ticket":
        return None
    model = state.model
    n = len(state.data.eval_dataset())
    if cfg.selection != "attention":
        table = layout.random_table(n, seed + 7, 0)
        return lambda: _eval_on_tickets(state, table, layout.forward(model))
    if cfg.teacher == "self":
        fwd = layout.online(model, model, seed + 7)
        return lambda: _eval_on_tickets(state, None, lambda x: fwd(x))
    table = layout.teacher_table(teacher, state.data.eval_dataset(), "eval")
    return lambda: _eval_on_tickets(state, table, layout.forward(model))


@register_stage(LotteryFinetune)
def lottery_finetune(cfg: LotteryFinetune, state):
    from lotus_deploy.data import shuffled_loader
    from lotus_deploy.prune.tickets import (
        SELECTIONS,
        TicketDataset,
        check_token_model,
        save_curves,
        ticket_overlap,
    )
    from lotus_deploy.state import StageResult

    cfg = train_settings(cfg, state)
    model = state.model
    check_token_model(model)
    sel = SELECTIONS[cfg.selection]
    seed = state.seed()
    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    named, teacher_name = _teacher(cfg, state)
    layout = _Layout(cfg, state, model, named if named is not None else model)
    K, P = layout.K, layout.P
    metrics: dict = {
        "selection": cfg.selection, **layout.metrics(len(model.blocks)), "sink": cfg.sink, "teacher": teacher_name,
        "scoring": cfg.scoring,
    }
    arts = {}

    # Eval tickets first: the teacher is still the model entering the stage.
    teacher = model if cfg.teacher == "self" else (named if named is not None else model)
    eval_on_tickets = _eval_tickets(cfg, state, layout, teacher, seed)

    table0, fig_teacher = None, teacher
    if cfg.scoring == "cached":
        train_ds = _plain_train(state)
        if data.cfg.augment != "none":
            state.log.info(f"{state.stage_name}: {AUGMENT_NOTE}")
            metrics["augment"], metrics["augment_note"] = "none", AUGMENT_NOTE
        else:
            metrics["augment"] = "none"
        metrics["scores_source"] = "none"
        fixed = layout.teacher_table(teacher, train_ds, "train", metrics) if sel.needs_teacher else None

        def table(epoch: int):
            return fixed if fixed is not None else layout.random_table(len(train_ds), seed, epoch)

        table0 = table(0)
        if sel.needs_teacher:  # how far the teacher's tickets are from a random control's
            metrics["random_shared"] = ticket_overlap(layout.last(table0), layout.last(layout.random_table(len(train_ds), seed, 0, "random")))["shared"]

        def make_loader(epoch: int):
            t = table(epoch) if epoch > 0 and sel.redraws else table0
            return shuffled_loader(TicketDataset(train_ds, t), seed + 1, bs, epoch, data.cfg.workers)  # distributed: this rank's share

        steps_per_epoch = math.ceil(len(train_ds) / bs)
        forward = layout.forward(model)
    else:
        train_ds = data.train
        metrics["augment"] = data.cfg.augment
        if sel.needs_teacher and cfg.teacher is None:
            teacher = fig_teacher = _frozen_copy(model)
        elif cfg.teacher == "self":
            fig_teacher = model
        forward = layout.online(model, teacher, _rank_seed(seed))  # each rank draws its own random tickets
        make_loader, steps_per_epoch = None, None
        metrics["scores_source"] = "online"

    if cfg.show:
        shown = layout.last(table0) if table0 is not None else None
        arts["tickets_png"] = ticket_figure(cfg, fig_teacher, train_ds if cfg.scoring == "cached" else _plain_train(state), state, seed,
                                            state.stage_dir / "tickets.png", cfg.show, K, table=shown, plan=layout.plan)

    if cfg.scoring == "cached":
        named = teacher = fig_teacher = None  # every score is computed: free a named teacher before training
    watch = early_bird_watch(cfg, state) if cfg.early_bird is not None else None
    hooks = watch.hooks() if watch is not None else {}
    early_bird_epoch = hooks.pop("on_epoch", None)

    def on_epoch(epoch: int, rec: dict) -> bool:
        if isinstance(forward, _TeacherClock):  # online: the teacher's passes inside this epoch's training seconds
            rec["teacher_seconds"] = forward.take()
        if eval_on_tickets is not None and "eval_top1" in rec:
            rec.update({f"eval_ticket_{k}": v for k, v in eval_on_tickets().items()})
            state.log.info(f"{state.stage_name} epoch {epoch}: eval on tickets {rec['eval_ticket_top1']:.2f}%")
        return bool(early_bird_epoch(epoch, rec)) if early_bird_epoch is not None else False

    where = f", dropped before blocks {list(layout.plan.at)} to {list(layout.plan.kept)}" if layout.plan is not None else ""
    state.log.info(
        f"{state.stage_name}: {cfg.selection} tickets, {K}/{P} patches + {layout.npre} prefix tokens{where} "
        f"({100 * metrics['token_fraction']:.0f}% of tokens), scoring {cfg.scoring}, teacher {teacher_name}"
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
    if cfg.scoring == "online":
        metrics["teacher_seconds"] = sum(h.get("teacher_seconds", 0.0) for h in history)
    if "ticket_top1" in final:
        metrics.update(ticket_top1=final["ticket_top1"], ticket_top5=final["ticket_top5"], ticket_eval_loss=final["ticket_loss"],
                       ticket_eval_images=final["ticket_images"])
    if watch is not None:
        finish_early_bird(watch, state, history, metrics, arts)
    return StageResult(metrics=metrics, artifacts=arts)


# ----------------------------------------------------------------------------- lotus tickets RUN --show N


def show_run_tickets(run_dir, show: int, out=None, stage: str | None = None):
    """Write the ticket grid of a run's ``lottery_finetune`` stage; returns the PNG path.

    The teacher is the stage's named teacher or the checkpoint entering the stage (the latest
    finished one before it; also for ``teacher: self``); random tickets use the stage's seed
    (epoch 1's tickets); a hierarchical stage shows the patches reaching its last location.

    Raises:
        RunError: the recipe has no such stage.
    """
    from pathlib import Path

    from lotus_deploy.errors import RunError
    from lotus_deploy.prune.tickets import drop_plan, num_kept, num_patches
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
    if cfg.teacher in (None, "self"):
        load_checkpoint(run.dir, checkpoint_entry(run.manifest, i - 1), state.model, state.device)
        teacher = state.model
    else:
        teacher, _ = _teacher(cfg, state)
    seed = state.seed()
    out = Path(out) if out is not None else run.dir / "stages" / f"{i + 1:02d}_{cfg.name}" / f"tickets-{show}.png"
    ds = _plain_train(state)
    plan = drop_plan(teacher, cfg.drop_at, cfg.location_keeps) if cfg.drop_at is not None else None
    k = plan.kept[-1] if plan is not None else num_kept(num_patches(teacher), cfg.keep_ratio)
    return ticket_figure(cfg, teacher.eval(), ds, state, seed, out, show, k, plan=plan)
