"""Data lottery tickets as Data-LTH and LOTUS ran them (issues 4 and 15), on the reference benchmark.

Arms (one ``lottery_finetune`` stage each, per seed, run by ``lotus_deploy.pipeline.compress``
from the same initial weights): attention tickets, random patches (the control) and all
patches, at one keep ratio. The protocol (issue 15), each part a flag:

* ``--teacher dense`` (default): a teacher fine-tuned on the task scores the patches: the
  ``dense`` variant of ``--teacher-run`` (e.g. ``runs/reference``, the reference model fine-tuned
  2 epochs on 5,000 images), else this benchmark's own all-patches arm of the same seed (run
  first). ``self``: the student's own attention, in its own forward (EViT); ``entering``: the
  model entering the stage (the raw backbone: the old protocol).
* ``--drop-at 3,6,9`` (default; ``1,2,3`` for ``--from-scratch``'s 4 blocks): hierarchical
  dropping, ``keep`` of the patches entering each location continue; ``--drop-at none``: tickets
  chosen once at the input (the old protocol).
* ``--scoring online`` with ``--augment crop_flip`` (default): every arm sees the same
  augmentation (the teacher scores each augmented batch); ``cached`` trains un-augmented.
* ``--eval-tokens ticket`` (default): each arm is evaluated on every patch and on tickets of
  the test images: the teacher's for attention arms, seeded random tickets for random arms.
* ``--seeds 0,1``, ``--eval-subset 2000``: the goal's standard error below 0.6 point.
* ``--from-scratch``: a small ViT (the demo model's width 64, 4 blocks, 4 heads; patch 4 at
  32 px: 64 patches) trained from random init on CIFAR-10 at 32 px, where Data-LTH and LOTUS
  report the ticket effect.

Goals reported: attention tickets >= random patches + 1.0 point at keep 0.7 (mean over seeds,
last epoch, both evaluations); wall time to reach (all patches) - 1 point <= 0.6 x all patches'.
Also: training-step time at several keeps (the arms' dropping layout), where the teacher's
tickets drop patches, and how far ``sink: normalize`` and ``exclude`` tickets differ. Results go to
``benchmarks/results/<name>.{md,json,png}`` (default ``tickets_protocol``; ``--from-scratch``:
``tickets_protocol_scratch``). The old protocol's results stay in ``tickets.md``.

Usage::

    python benchmarks/tickets.py --teacher-run runs/reference      # pretrained ViT-S/14 (hours on CPU)
    python benchmarks/tickets.py --from-scratch                    # small ViT from scratch at 32 px
    python benchmarks/tickets.py --quick --work /tmp/t             # smoke test on tiny subsets

Finished arms are reused from ``--work`` (rerun with ``--fresh``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

from _common import (
    CIFAR10,
    DINOV2,
    MODEL,
    ROOT,
    log,
    missing_shared,
    reference_recipe,
    results_header,
    standard_error_line,
)

# name -> (selection, keep)
ARMS = {
    "attention-0.7": ("attention", 0.7),
    "random-0.7": ("random", 0.7),
    "all-patches": ("full", 1.0),
    "attention-drop0.1": ("attention", 0.9),
    "random-drop0.1": ("random", 0.9),
}
DEFAULT_ARMS = ["all-patches", "attention-0.7", "random-0.7"]
STEP_KEEPS = [1.0, 0.9, 0.7, 0.5]
SCRATCH_MODEL = "lotus_vit_tiny_patch8_32"  # the demo model; built with patch 4 here
GOAL_POINTS, GOAL_TIME, GOAL_SE = 1.0, 0.6, 0.6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny subsets, 2 epochs, 1 seed, 2 timed steps")
    p.add_argument("--full", action="store_true", help="all 50,000 train / 10,000 test images (for a GPU)")
    p.add_argument("--from-scratch", action="store_true", help=f"small ViT ({SCRATCH_MODEL}, patch 4, 32 px) from random init instead of the pretrained ViT-S/14")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated arms from {', '.join(ARMS)}")
    p.add_argument("--teacher", choices=["dense", "self", "entering"], default="dense", help="who scores the patches (see above)")
    p.add_argument("--teacher-run", type=Path, help="finished run whose `dense` variant is the teacher (same model and input size); default this benchmark's all-patches arm")
    p.add_argument("--drop-at", help="hierarchical drop locations, e.g. 3,6,9; none: input-level tickets (default 3,6,9; from scratch 1,2,3)")
    p.add_argument("--scoring", choices=["online", "cached"], default="online", help="online: the teacher scores each augmented batch; cached: once, no augmentation")
    p.add_argument("--augment", choices=["crop_flip", "crop", "none"], default="crop_flip", help="training augmentation of every arm (cached scoring trains un-augmented)")
    p.add_argument("--eval-tokens", choices=["ticket", "all"], default="ticket", help="ticket: evaluate on every patch and on tickets of the test images; all: every patch only")
    p.add_argument("--sink", choices=["normalize", "exclude"], default="normalize")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; quick 0)")
    p.add_argument("--epochs", type=int, help="epochs per arm (default 5; from scratch 30; quick 2)")
    p.add_argument("--train-subset", type=int, help="default 5000 (quick 32)")
    p.add_argument("--eval-subset", type=int, help="default 2000 (quick 32)")
    p.add_argument("--batch", type=int, help="training batch size (images; default 64, from scratch 128, quick 16)")
    p.add_argument("--img-size", type=int, help="input size in pixels (default 112, from scratch 32, quick 56)")
    p.add_argument("--lr", type=float, help="peak lr of the head (default 1e-3); backbone 3e-5 (pretrained) or the same lr (from scratch)")
    p.add_argument("--step-iters", type=int, help="timed steps per keep and round (default 5; quick 2)")
    p.add_argument("--step-rounds", type=int, help="interleaved timing rounds (default 3; quick 1)")
    p.add_argument("--sink-images", type=int, help="training images for the sink comparison and the drop map (default 500; quick 16)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: steps, accuracy, sink, position")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--work", type=Path, help="run directories (default runs/bench-tickets-protocol[-scratch][-quick])")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; with --quick or --work: WORK/results)")
    p.add_argument("--name", help="results file stem (default tickets_protocol[_scratch])")
    p.add_argument("--fresh", action="store_true", help="rerun arms that already finished in --work")
    a = p.parse_args(argv)
    q, s = a.quick, a.from_scratch
    a.seeds = [int(x) for x in (a.seeds or ("0" if q else "0,1")).split(",") if x != ""]
    a.epochs = a.epochs or (2 if q else 30 if s else 5)
    a.train_subset = None if a.full else (a.train_subset or (32 if q else 5000))
    a.eval_subset = None if a.full else (a.eval_subset or (32 if q else 2000))
    a.batch = a.batch or (16 if q else 128 if s else 64)
    a.img_size = a.img_size or (32 if s else 56 if q else 112)
    a.lr = a.lr or 1e-3
    a.step_iters = a.step_iters or (2 if q else 5)
    a.step_rounds = a.step_rounds or (1 if q else 3)
    a.sink_images = a.sink_images or (16 if q else 500)
    drop_at = a.drop_at if a.drop_at is not None else ("1,2,3" if s else "3,6,9")
    a.drop_at = None if drop_at.lower() in ("none", "") else [int(x) for x in drop_at.split(",")]
    a.arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if a.teacher == "self" and a.scoring != "online":
        p.error("--teacher self scores inside the student's forward: use --scoring online")
    if a.teacher_run is not None and a.teacher != "dense":
        p.error("--teacher-run goes with --teacher dense")
    if a.teacher == "dense" and a.teacher_run is None and "all-patches" not in a.arms:
        a.arms.insert(0, "all-patches")  # the all-patches arm of each seed is the teacher
    a.arms.sort(key=lambda x: x != "all-patches")  # teachers first
    a.skip = {x for x in a.skip.split(",") if x}
    stem = "-scratch" if s else ""
    suffix = "-quick" if q else ("-full" if a.full else "")
    own_work = a.work is not None
    a.work = a.work or ROOT / "runs" / f"bench-tickets-protocol{stem}{suffix}"
    a.out = a.out or (a.work / "results" if q or own_work else ROOT / "benchmarks" / "results")
    a.name = a.name or ("tickets_protocol_scratch" if s else "tickets_protocol")
    return a


# ----------------------------------------------------------------------------- recipes


def base_recipe(args, name: str, seed: int) -> dict:
    """The run's recipe without stages: the reference model and data, or the small ViT from scratch at 32 px."""
    a = argparse.Namespace(**{**vars(args), "seed": seed})
    r = reference_recipe(a, name)
    r["data"]["augment"] = args.augment
    r["data"]["eval_batch_size"] = 256 if args.from_scratch else 128
    if args.from_scratch:
        r["model"] = {"name": SCRATCH_MODEL, "img_size": args.img_size, "num_classes": 10, "kwargs": {"patch_size": 4}}
        r["train"] = {"backbone_lr_scale": 1.0, "grad_clip": 0.0, "label_smoothing": 0.1}
    return r


def stage_dict(args, arm: str, seed: int) -> dict:
    """One ``lottery_finetune`` stage for ``arm`` under the protocol's flags."""
    selection, keep = ARMS[arm]
    stage = {
        "kind": "lottery_finetune", "name": arm.replace(".", "_"), "train": "all", "epochs": args.epochs,
        "lr": args.lr, "backbone_lr": args.lr if args.from_scratch else 3e-5, "weight_decay": 0.05, "warmup": 0.1,
        "schedule": "cosine", "label_smoothing": 0.1, "selection": selection, "sink": args.sink, "scoring": args.scoring,
        "eval_tokens": args.eval_tokens if selection != "full" else "all", "show": 16,
    }
    if args.drop_at is not None and selection != "full":
        stage.update(drop_at=args.drop_at, keep=keep)
    else:
        stage["keep"] = keep
    if selection == "attention":
        if args.teacher == "self":
            stage["teacher"] = "self"
        elif args.teacher == "dense":
            stage.update(teacher="dense", teacher_run=str(teacher_run(args, seed).resolve()))
    return stage


def teacher_run(args, seed: int) -> Path:
    """The run whose ``dense`` variant teaches the attention arms of ``seed``."""
    return args.teacher_run if args.teacher_run is not None else args.work / f"all-patches-s{seed}"


def check_teacher_run(args) -> None:
    """Refuse a ``--teacher-run`` whose model or input size differs from the arms' (before any training)."""
    from lotus_deploy.run import Run

    if args.teacher != "dense" or args.teacher_run is None:
        return
    run = Run(args.teacher_run)
    m = run.recipe.model
    want = base_recipe(args, "check", args.seeds[0])["model"]
    if m.name != want["name"] or (m.img_size or 0) != want["img_size"]:
        raise SystemExit(f"--teacher-run {args.teacher_run}: model {m.name} at {m.img_size} px; the arms use {want['name']} at {want['img_size']} px")
    if "dense" not in run.variants():
        raise SystemExit(f"--teacher-run {args.teacher_run}: no finished `dense` variant yet")


def recipe_dict(args, arm: str, seed: int) -> dict:
    return {**base_recipe(args, f"tickets-{arm}-s{seed}", seed), "stages": [stage_dict(args, arm, seed)]}


# ----------------------------------------------------------------------------- 1. step time


def step_times(args, log) -> list[dict]:
    """Median ms per training step at each keep (the arms' dropping layout), interleaved rounds on one real batch."""
    import torch

    from lotus_deploy.data import build_data
    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.prune import tickets as T
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import resolve_device
    from lotus_deploy.train import autocast as precision
    from lotus_deploy.train import param_groups

    r = parse_recipe({**base_recipe(args, "steps", args.seeds[0]), "stages": []})
    device = resolve_device(r.device)
    torch.manual_seed(args.seeds[0])
    model = build_model(r.model).to(device).train()
    data = build_data(r.data.model_copy(update={"augment": "none"}), input_spec(model))
    x, y = next(iter(data.train_loader(seed=args.seeds[0], batch_size=args.batch)))
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(param_groups(model, "all", 1e-3, 3e-5, 0.05), lr=1e-3)
    P, npre, depth = T.num_patches(model), int(model.num_prefix_tokens), len(model.blocks)
    layouts = {}
    for k in STEP_KEEPS:  # keep -> (forward, tokens per block), resolved once
        if args.drop_at is None or k == 1.0:
            idx = T.select_tickets(None, x.shape[0], P, T.num_kept(P, k), "random", args.seeds[0]).to(device)
            layouts[k] = ((lambda idx=idx: T.forward_tokens(model, x, idx)), [npre + idx.shape[1]] * depth)
        else:
            plan = T.drop_plan(model, args.drop_at, [k] * len(args.drop_at))
            tickets = [t.to(device) for t in T.random_nested_tickets(x.shape[0], plan, args.seeds[0])]
            layouts[k] = ((lambda plan=plan, t=tickets: T.forward_tokens_dropping(model, x, plan, t)), plan.tokens_per_block(depth, npre))
    autocast = precision(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(fwd):
        with autocast:
            loss = torch.nn.functional.cross_entropy(fwd().float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[float, list[float]] = {k: [] for k in STEP_KEEPS}
    for k in STEP_KEEPS:  # warm-up (allocator, kernels) at every shape
        step(layouts[k][0])
    for rnd in range(args.step_rounds):
        for k in STEP_KEEPS:
            sync()
            for _ in range(args.step_iters):
                t0 = time.perf_counter()
                step(layouts[k][0])
                sync()
                times[k].append(1000 * (time.perf_counter() - t0))
        log(f"step time round {rnd + 1}/{args.step_rounds}: " + ", ".join(f"keep {k}: {statistics.median(times[k]):.0f} ms" for k in STEP_KEEPS))
    base = statistics.median(times[1.0])
    full_tokens = depth * (npre + P)
    rows = []
    for k in STEP_KEEPS:
        tokens = layouts[k][1]
        frac = sum(tokens) / full_tokens
        ms = statistics.median(times[k])
        rows.append({
            "keep": k, "tokens_per_block": tokens, "token_fraction": frac, "ms_per_step": ms, "ms_min": min(times[k]),
            "ms_max": max(times[k]), "ratio": ms / base, "goal": min(1.0, frac + 0.05), "met": ms / base <= frac + 0.05,
            "steps_timed": len(times[k]),
        })
    return rows


# ----------------------------------------------------------------------------- 2. accuracy per epoch


def run_arm(args, arm: str, seed: int, log) -> dict:
    """Run (or reuse) one arm for one seed; returns its stage metrics and wall time."""
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe, stage_fingerprint

    run_dir = args.work / f"{arm}-s{seed}"
    mpath = run_dir / "manifest.json"
    recipe = parse_recipe(recipe_dict(args, arm, seed))
    base = {"arm": arm, "seed": seed, "run_dir": str(run_dir)}
    if mpath.is_file() and not args.fresh:
        entry = read_json(mpath)["stages"][0]
        if entry["status"] == "done" and entry["fingerprint"] == stage_fingerprint(recipe, 0):
            log(f"{arm} seed {seed}: reusing finished run {run_dir}")
            return {**base, "reused": True, "wall_s": entry["wall_s"], **entry["metrics"]}
    log(f"{arm} seed {seed}: running into {run_dir}")
    t0 = time.perf_counter()
    compress(recipe, out=run_dir, force=True, quiet=not sys.stderr.isatty())
    entry = read_json(mpath)["stages"][0]
    return {**base, "reused": False, "wall_s": time.perf_counter() - t0, **entry["metrics"]}


def mean_curve(runs: list[dict]) -> list[dict]:
    """Per-epoch means over seeds: eval top-1 (both evaluations), training and teacher seconds."""
    E = min(len(r["history"]) for r in runs)
    out = []
    for e in range(E):
        hs = [r["history"][e] for r in runs]
        row = {"epoch": e + 1, "seconds": statistics.fmean(h["seconds"] for h in hs),
               "teacher_seconds": statistics.fmean(h.get("teacher_seconds", 0.0) for h in hs)}
        for key in ("eval_top1", "eval_ticket_top1"):
            if all(key in h for h in hs):
                row[key] = statistics.fmean(h[key] for h in hs)
        out.append(row)
    return out


def time_to(curve: list[dict], target: float, score_seconds: float = 0.0, teacher: bool = True) -> float | None:
    """Cumulative seconds at the first epoch whose eval top-1 >= target.

    Args:
        score_seconds: a cached teacher pass before training (added once).
        teacher: count the online teacher's passes (inside the training seconds); False subtracts them.
    """
    t = score_seconds
    for h in curve:
        t += h["seconds"] - (0.0 if teacher else h.get("teacher_seconds", 0.0))
        if h.get("eval_top1", -1) >= target:
            return t
    return None


def se_points(top1: float, images: int, seeds: int) -> float:
    """Binomial standard error (points) of a mean top-1 over ``seeds`` evaluations of ``images`` images."""
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / images / seeds)


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    """Means over seeds per arm and the goals of issue 15."""
    eval_images = args.eval_subset or 10000
    arms = {}
    for arm, rs in runs.items():
        curve = mean_curve(rs)
        last = [r["history"][-1] for r in rs]
        row = {"arm": arm, "seeds": [r["seed"] for r in rs], "curve": curve, "top1": statistics.fmean(h["eval_top1"] for h in last),
               "top1_per_seed": [h["eval_top1"] for h in last], "train_seconds": statistics.fmean(r["train_seconds"] for r in rs),
               "teacher_seconds": statistics.fmean(r.get("teacher_seconds", 0.0) for r in rs),
               "score_seconds": statistics.fmean(r.get("score_seconds", 0.0) for r in rs),
               "token_fraction": rs[0]["token_fraction"], "kept_patches": rs[0]["kept_patches"], "keep": rs[0]["keep"]}
        row["se"] = se_points(row["top1"], eval_images, len(rs))
        if all("eval_ticket_top1" in h for h in last):
            row["ticket_top1"] = statistics.fmean(h["eval_ticket_top1"] for h in last)
            row["ticket_top1_per_seed"] = [h["eval_ticket_top1"] for h in last]
            row["ticket_se"] = se_points(row["ticket_top1"], eval_images, len(rs))
        arms[arm] = row
    goals: dict = {}
    att, rnd, full = arms.get("attention-0.7"), arms.get("random-0.7"), arms.get("all-patches")
    if att and rnd:
        for key, what in (("top1", "all patches"), ("ticket_top1", "tickets")):
            if key in att and key in rnd:
                d = att[key] - rnd[key]
                se = max(att["se" if key == "top1" else "ticket_se"], rnd["se" if key == "top1" else "ticket_se"])
                goals[f"tickets_minus_random_{key}"] = {"eval": what, "points": d, "goal": GOAL_POINTS, "met": d >= GOAL_POINTS,
                                                         "se_per_arm": se, "se_below": se < GOAL_SE}
    if att and full:
        target = full["top1"] - 1.0
        goals["target_top1"] = target
        tf = time_to(full["curve"], target)
        for key, teacher in (("time_ratio", True), ("time_ratio_without_teacher", False)):
            ta = time_to(att["curve"], target, att["score_seconds"] if teacher else 0.0, teacher)
            ratio = None if ta is None or tf is None else ta / tf
            goals[key] = {"tickets_s": ta, "all_patches_s": tf, "ratio": ratio, "goal": GOAL_TIME, "met": ratio is not None and ratio <= GOAL_TIME}
    return {"arms": arms, "goals": goals, "eval_images": eval_images}


# ----------------------------------------------------------------------------- 3. where the teacher's tickets drop, sink handling


def teacher_model(args):
    """(the teacher of seed ``seeds[0]``'s attention arm, its description, un-augmented training data), eval mode.

    ``dense``: the teacher run's ``dense`` variant (run the accuracy part first when it is this
    benchmark's all-patches arm); ``self`` / ``entering``: the initial model of that seed.
    """
    import torch

    from lotus_deploy.data import build_data
    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import Run, resolve_device

    seed = args.seeds[0]
    r = parse_recipe({**base_recipe(args, "teacher", seed), "stages": []})
    device = resolve_device(r.device)
    if args.teacher == "dense":
        run = teacher_run(args, seed)
        model, _ = Run(run).load("dense", device=str(device))
        what = f"`dense` of {run}"
    else:
        torch.manual_seed(seed)
        model = build_model(r.model).to(device)
        what = f"the initial model (seed {seed})"
    data = build_data(r.data.model_copy(update={"augment": "none"}), input_spec(model))
    return model.eval(), what, data, device


def drop_map(args, log) -> dict:
    """Where the teacher's tickets drop patches (the last location's, for hierarchical dropping) on the first training images.

    Returns:
        ``grid``: (rows, cols) fraction of images dropping each patch position; ``positional``:
        share of the dropped patches that lie in the P - K most-dropped positions (1.0 = one
        fixed positional mask for every image; a uniform random choice gives (P - K) / P).
    """
    from torch.utils.data import Subset

    from lotus_deploy.prune import tickets as T

    model, what, data, device = teacher_model(args)
    n = min(args.sink_images, len(data.train))
    ds = Subset(data.train, list(range(n)))
    P = T.num_patches(model)
    keep = ARMS["attention-0.7"][1]
    if args.drop_at is not None:
        plan = T.drop_plan(model, args.drop_at, [keep] * len(args.drop_at))
        table = T.plan_tables(T.hierarchical_dataset(model, ds, plan, device, args.sink, 128, args.workers), plan)
        table, K = plan.split(table)[-1], plan.kept[-1]
    else:
        K = T.num_kept(P, keep)
        s = T.score_dataset(model, ds, T.resolve_blocks(model, "last"), device, 128, args.workers)[args.sink]
        table = T.select_tickets(s, n, P, K, "attention")
    freq = T.drop_frequency(table, P)  # (P,)
    positional = (freq.topk(P - K).values.sum() / freq.sum()).item()
    side = math.isqrt(P)
    log(f"drop map: {100 * positional:.1f}% of dropped patches in the {P - K} most-dropped positions")
    return {"teacher": what, "images": n, "patches": P, "kept": K, "grid": freq.view(side, side).tolist(),
            "positional": positional, "positional_chance": (P - K) / P}


def sink_comparison(args, log) -> list[dict]:
    """normalize vs exclude input-level tickets of the teacher on the first ``sink_images`` un-augmented training images."""
    from torch.utils.data import Subset

    from lotus_deploy.prune import tickets as T

    model, _, data, device = teacher_model(args)
    n = min(args.sink_images, len(data.train))
    ds = Subset(data.train, list(range(n)))
    P = T.num_patches(model)
    rows = []
    for blocks in ("last", "mean"):
        s = T.score_dataset(model, ds, T.resolve_blocks(model, blocks), device, 128, args.workers, desc=f"sink {blocks}")
        for keep in (0.9, 0.7, 0.5):
            K = T.num_kept(P, keep)
            a, b = (T.select_tickets(s[m], n, P, K, "attention") for m in ("normalize", "exclude"))
            ov = T.ticket_overlap(a, b)
            rows.append({"blocks": blocks, "keep": keep, "kept_patches": K, "images": n,
                         "shared": ov["shared"], "images_changed": ov["images_changed"]})
        log(f"sink ({blocks}): " + ", ".join(f"keep {r_['keep']}: {100 * r_['shared']:.1f}% shared" for r_ in rows if r_["blocks"] == blocks))
    return rows


# ----------------------------------------------------------------------------- report


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def markdown(args, res: dict) -> str:
    env = res["environment"]
    title = "Data lottery tickets, Data-LTH / LOTUS protocol" + (" — small ViT from scratch" if args.from_scratch else " — pretrained ViT-S/14")
    lines = [
        "# " + title + (" (QUICK SMOKE RUN: numbers mean nothing)" if args.quick else ""),
        "",
        f"Measured {res['date']} on {env.get('gpu') or env['cpu']} ({env['torch_threads']} torch threads), "
        f"torch {env['torch']}, timm {env['timm']}. Command: `{res['command']}`. The old protocol's results: `tickets.md`.",
        "",
    ]
    s = res.get("summary")
    if s:
        g = s["goals"]
        lines += ["## Goals (means over seeds, last epoch)", ""]
        for key in ("tickets_minus_random_top1", "tickets_minus_random_ticket_top1"):
            if key in g:
                t = g[key]
                lines.append(
                    f"- Attention tickets − random patches at keep 0.7, evaluated on {t['eval']}: {t['points']:+.2f} points (goal ≥ +{GOAL_POINTS:g}): "
                    f"**{'met' if t['met'] else 'not met'}**; standard error per arm {t['se_per_arm']:.2f} point "
                    f"({'below' if t['se_below'] else 'NOT below'} {GOAL_SE})."
                )
        for key, what in (("time_ratio", "teacher passes and scoring included"), ("time_ratio_without_teacher", "student training only")):
            if key in g:
                t = g[key]
                lines.append(
                    f"- Wall time to reach all patches − 1 point ({g['target_top1']:.2f}%), tickets / all patches, {what}: "
                    f"{_f(t['tickets_s'], '{:.1f}')} s / {_f(t['all_patches_s'], '{:.1f}')} s = {_f(t['ratio'], '{:.3f}')} "
                    f"(goal ≤ {GOAL_TIME}): **{'met' if t['met'] else 'not met'}**."
                )
        lines.append("")
        E = max(len(a["curve"]) for a in s["arms"].values())
        lines += [
            f"## Eval top-1 (%) per epoch, mean over seeds ({s['eval_images']} eval images; all patches / on tickets)",
            "",
            "| arm | keep (last) | token fraction | " + " | ".join(f"ep {e + 1}" for e in range(E)) + " | per seed | on tickets | per seed | train s | teacher s |",
            "|---|---:|---:|" + "---:|" * E + "---|---:|---|---:|---:|",
        ]
        for name, a in s["arms"].items():
            accs = [_f(h.get("eval_top1")) for h in a["curve"]] + ["—"] * (E - len(a["curve"]))
            seeds = ", ".join(f"{v:.2f}" for v in a["top1_per_seed"])
            tseeds = ", ".join(f"{v:.2f}" for v in a.get("ticket_top1_per_seed", []))
            lines.append(
                f"| {name} | {a['keep']:.3f} | {a['token_fraction']:.3f} | " + " | ".join(accs)
                + f" | {seeds} | {_f(a.get('ticket_top1'))} | {tseeds or '—'} | {a['train_seconds']:.0f} | {a['teacher_seconds'] + a['score_seconds']:.0f} |"
            )
        lines.append("")
    if res.get("steps"):
        lines += [
            f"## Training-step time (batch {args.batch}, forward + backward + AdamW, the arms' dropping layout)",
            "",
            "| keep | tokens per block | token fraction | ms / step (median) | min – max | ratio to keep 1.0 | goal ≤ | met |",
            "|---:|---|---:|---:|---:|---:|---:|:---:|",
        ]
        for r in res["steps"]:
            tok = r["tokens_per_block"]
            tok_s = f"{tok[0]}" if len(set(tok)) == 1 else "/".join(str(t) for t in sorted(set(tok), reverse=True))
            lines.append(
                f"| {r['keep']} | {tok_s} | {r['token_fraction']:.3f} | {r['ms_per_step']:.0f} | {r['ms_min']:.0f} – {r['ms_max']:.0f} "
                f"| {r['ratio']:.3f} | {r['goal']:.2f} | {'yes' if r['met'] else 'no'} |"
            )
        lines.append("")
    pb = res.get("position")
    if pb:
        side = len(pb["grid"])
        lines += [
            f"## Where the teacher's tickets drop patches ({pb['teacher']}; {pb['images']} un-augmented training images, "
            f"{pb['patches'] - pb['kept']} of {pb['patches']} dropped by the last location)",
            "",
            "| row | " + " | ".join(f"c{c}" for c in range(side)) + " |",
            "|---:|" + "---:|" * side,
        ]
        lines += [f"| r{r} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for r, row in enumerate(pb["grid"])]
        lines += ["", f"{100 * pb['positional']:.1f}% of the dropped patches lie in the {pb['patches'] - pb['kept']} most-dropped positions "
                  f"(one fixed positional mask: 100%; uniform random: {100 * pb['positional_chance']:.1f}%).", ""]
    if res.get("sink"):
        lines += [
            "## Sink handling of the teacher's input-level tickets: normalize (LOTUS) vs exclude (Data-LTH)",
            "",
            "| blocks | keep | kept patches | images | kept patches shared | images whose ticket changes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {r['blocks']} | {r['keep']} | {r['kept_patches']} | {r['images']} | {100 * r['shared']:.1f}% | {100 * r['images_changed']:.1f}% |"
                  for r in res["sink"]]
        lines.append("")
    lines += ["## Protocol", ""] + [f"- {p}" for p in res["protocol"]] + [""]
    return "\n".join(lines)


def protocol(args) -> list[str]:
    subset = "all 50,000 train / 10,000 test images" if args.full else f"class-balanced seeded subsets: {args.train_subset} train / {args.eval_subset} test images (subset seed 0)"
    if args.from_scratch:
        g = args.img_size // 4
        model = (f"Model: `{SCRATCH_MODEL}` with patch 4 at {args.img_size} px ({g}×{g} = {g * g} patches + CLS; width 64, 4 blocks, 4 heads), "
                 f"random init per seed; one lr {args.lr:g} everywhere.")
        data = f"Data: CIFAR-10 from `{CIFAR10}`, {subset}; 32 px, no resize; mean/std 0.5."
    else:
        g = args.img_size // 14
        model = (f"Model: `{MODEL}` from `{DINOV2}` at {args.img_size} px ({g}×{g} = {g * g} patches + CLS), new 10-class head; "
                 f"head lr {args.lr:g}, backbone lr 3e-5.")
        data = f"Data: CIFAR-10 from `{CIFAR10}`, {subset}; 32 px → bicubic {args.img_size} px → ImageNet mean/std."
    teacher = {
        "dense": f"the `dense` variant of {'`' + str(args.teacher_run) + '`' if args.teacher_run else 'this benchmark’s all-patches arm of the same seed'} (a model trained on the task with every patch)",
        "self": "the student itself: its own CLS attention inside its own forward (EViT)",
        "entering": "the model entering the stage (the old protocol)",
    }[args.teacher]
    where = (f"hierarchical: before blocks {args.drop_at}, keep of the patches entering each location continue "
             f"(K_i = ceil(keep × K_(i−1))), chosen by the CLS attention of the block before each location"
             if args.drop_at else "input-level: K = ceil(keep × patches) patches chosen once before the first block")
    return [
        data,
        model,
        f"Arms per seed ({', '.join(map(str, args.seeds))}): one `lottery_finetune` stage each, run by `lotus_deploy.pipeline.compress` from the same "
        f"initial weights: AdamW (weight decay 0.05), 10% warm-up then cosine over {args.epochs} epochs, label smoothing 0.1, batch {args.batch}; "
        "same subsets, shuffling seeds and number of steps (a token-dropped image counts as one image).",
        f"Augmentation: `{args.augment if args.scoring == 'online' else 'none'}` in every arm "
        + ("(scoring online: the teacher scores each augmented batch)." if args.scoring == "online" else "(cached scores: un-augmented training)."),
        f"Tickets: teacher = {teacher}; `sink: {args.sink}`; {where}; prefix tokens always kept; random arms draw new patches per batch/epoch (seeded).",
        f"Evaluation after every epoch on all patches; {'also on tickets of the test images (attention: the teacher’s; random: seeded random tickets, fixed for the run)' if args.eval_tokens == 'ticket' else 'not on tickets'}.",
        "Train seconds = training loops only (no evaluation), online teacher passes included; teacher seconds = those passes "
        "(plus a cached scoring pass); time to target is read at epoch ends on the seed-mean curve.",
        f"Step time: one real batch of {args.batch}, random tickets in the arms' layout at each keep, one warm-up step per keep, then "
        f"{args.step_rounds} interleaved round(s) of {args.step_iters} timed steps; goal ≤ token fraction + 0.05.",
        standard_error_line(args.eval_subset or 10000) + f" Over {len(args.seeds)} seed(s) the mean's standard error is that / √{len(args.seeds)}.",
    ]


def plot(path: Path, summary: dict) -> Path:
    """Seed-mean eval top-1 against epoch and against cumulative training seconds, one line per arm."""
    from lotus_deploy.plots import new_figure, save_figure

    fig = new_figure(9.6, 3.6)
    a, b = fig.subplots(1, 2)
    for name, arm in summary["arms"].items():
        ep = [h["epoch"] for h in arm["curve"] if "eval_top1" in h]
        acc = [h["eval_top1"] for h in arm["curve"] if "eval_top1" in h]
        t, cum = arm.get("score_seconds", 0.0), []
        for h in arm["curve"]:
            t += h["seconds"]
            if "eval_top1" in h:
                cum.append(t)
        a.plot(ep, acc, "o-", ms=3.5, label=name)
        b.plot(cum, acc, "o-", ms=3.5, label=name)
        tick = [h["eval_ticket_top1"] for h in arm["curve"] if "eval_ticket_top1" in h]
        if len(tick) == len(ep):
            a.plot(ep, tick, "x--", ms=3.5, alpha=0.6, label=f"{name} on tickets")
    a.set(xlabel="epoch", ylabel="eval top-1 (%)")
    b.set(xlabel="training seconds (+ scoring)", ylabel="eval top-1 (%)")
    a.xaxis.get_major_locator().set_params(integer=True)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.3)
    return save_figure(fig, path)


def _variants(run_dir: Path) -> dict:
    """A run's finished variants, or {} when it is not a finished run yet."""
    from lotus_deploy.errors import RunError
    from lotus_deploy.run import Run

    try:
        return Run(run_dir).variants()
    except RunError:
        return {}


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = None if args.from_scratch and CIFAR10.is_dir() else missing_shared()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    check_teacher_run(args)
    from lotus_deploy.files import write_json, write_text

    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {**results_header("tickets.py", argv), "quick": args.quick, "from_scratch": args.from_scratch,
                 "seeds": args.seeds, "eval_images": args.eval_subset or 10000,
                 "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("skip",)}}
    if "steps" not in args.skip:
        res["steps"] = step_times(args, log)
    if "accuracy" not in args.skip:
        runs: dict[str, list[dict]] = {}
        for seed in args.seeds:
            for arm in args.arms:
                r = run_arm(args, arm, seed, log)
                runs.setdefault(arm, []).append(r)
                log(f"{arm} seed {seed}: " + ", ".join(f"ep {x['epoch']} {x.get('eval_top1', float('nan')):.2f}%" for x in r["history"])
                    + (f"; on tickets {r['ticket_top1']:.2f}%" if "ticket_top1" in r else ""))
        res["runs"] = runs
        res["summary"] = summarize(args, runs)
    for part, fn in (("position", drop_map), ("sink", sink_comparison)):
        if part in args.skip:
            continue
        if args.teacher == "dense" and "dense" not in _variants(teacher_run(args, args.seeds[0])):
            log(f"{part}: skipped (the teacher has not finished: run the accuracy part first)")
            continue
        res[part] = fn(args, log)
    res["protocol"] = protocol(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", res)
    write_text(args.out / f"{args.name}.md", markdown(args, res))
    if res.get("summary"):
        plot(args.out / f"{args.name}.png", res["summary"])
    log(f"results: {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
