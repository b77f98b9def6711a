"""Essential sparsity, Instant Soup Pruning and early-bird tickets on the reference benchmark (issue 3).

Runs the reference benchmark of ``../shared/REFERENCE.md`` (CIFAR-10, DINOv2 ViT-S/14 at 112 px)
through ``lotus_deploy.pipeline.compress`` and writes a results table with its protocol to
``benchmarks/results/sparsity_soup.md`` (raw numbers in ``sparsity_soup.json``, the sweep in
``sparsity_soup_sweep.png``):

1. Dense: full fine-tune of the pretrained model with a new head (``dense``), with early-bird
   detection at ``--eb-sparsity`` every ``--eb-every`` steps (recorded, not stopping).
2. The one-shot magnitude sweep (``essential_sparsity``, 0 .. 0.5) of the dense model and its knee
   (tolerance 1 point) and curvature knee.
3. At each target (default 50% and 60%), arms continuing from the dense model with the same
   post-dense budget in images seen:
   - ``oneshot``: one-shot magnitude prune to the target, then fine-tune (accuracy before and after);
   - ``isp``: Instant Soup Pruning, ``combine: union`` (starting from the knee prune by default);
   - ``issp``: LOTUS's ISSP, ``combine: union_levels`` (knee prune, masks at several levels of one
     model trained on a data fraction, union, remainder one-shot, fine-tune).
   ISP runs first; its images seen (rounds + fine-tune) set the budget of the other arms when they
   exceed ``--budget-images``.
4. Early bird: where the dense run drew the ticket, and a model pruned with the ticket (training
   stopped at the drawing check) then fine-tuned, against the final mask (prune after the whole
   dense fine-tune) fine-tuned with the same recovery budget.

Usage::

    python benchmarks/sparsity_soup.py            # CPU reference: 5,000 / 2,000 images (about an hour or more on 2 cores)
    python benchmarks/sparsity_soup.py --full     # all 50,000 / 10,000 images, paper-sized soup (GPU)
    python benchmarks/sparsity_soup.py --quick    # smoke test on tiny subsets at 56 px (minutes; numbers mean nothing)

Every arm is its own run directory under ``--work``; arms start from a hard-linked copy of the
dense run (finished stages are reused by fingerprint, so the dense fine-tune and the sweep run
once), and finished arms are reused on a rerun (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

from _common import (
    MODEL,
    ROOT,
    log,
    missing_shared,
    reference_recipe,
    results_header,
    standard_error_line,
)

TRAIN = {"lr": 1e-3, "backbone_lr": 3e-5, "weight_decay": 0.05, "label_smoothing": 0.1}  # REFERENCE.md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 128 train / 64 eval images at 56 px, tiny budgets")
    p.add_argument("--full", action="store_true", help="all 50,000 train / 10,000 test images and the paper-sized soup (for a GPU)")
    p.add_argument("--train-subset", type=int, help="default 5000 (quick 128)")
    p.add_argument("--eval-subset", type=int, help="default 2000 (quick 64)")
    p.add_argument("--img-size", type=int, help="input pixels (default 112; quick 56)")
    p.add_argument("--batch", type=int, help="training batch size (default 64; quick 16)")
    p.add_argument("--dense-epochs", type=float, help="dense fine-tune epochs (default 2; quick 1)")
    p.add_argument("--targets", default="0.5,0.6", help="comma-separated target sparsities")
    p.add_argument("--budget-images", type=int, help="post-dense images seen per arm (default 5000; full 50000; quick 128)")
    p.add_argument("--isp-start", choices=["knee", "dense"], help="ISP starts from the knee prune or the dense model (default knee; quick dense)")
    p.add_argument("--isp-learners", type=int, help="learners per round (default 3; full 5)")
    p.add_argument("--isp-fraction", type=float, help="data fraction per learner and for the main model (default 0.05; full 0.1)")
    p.add_argument("--isp-step", type=float, help="fraction of remaining weights a learner prunes per round (default 0.2; full 0.1)")
    p.add_argument("--round-lr-scale", type=float, default=1.0,
                   help="ISP and ISSP: multiply the learning rates in the rounds (learners, main model) by this; arms get a _rls<scale> suffix")
    p.add_argument("--issp-fraction", type=float, default=0.1, help="ISSP: data fraction of its one model (LOTUS: 10%%)")
    p.add_argument("--round-eval-images", type=int, help="eval images for per-round accuracies (default 500; full all; quick 32)")
    p.add_argument("--eb-sparsity", type=float, default=0.5, help="sparsity of the early-bird mask")
    p.add_argument("--eb-every", type=int, help="early-bird check interval in steps (default 10; full 100; quick 1)")
    p.add_argument("--eb-window", type=int, help="masks in the early-bird window (default 5; quick 3)")
    p.add_argument("--eb-threshold", type=float, default=0.1)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: oneshot, isp, issp, early_bird")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="run directories (default runs/bench-sparsity-soup[-quick|-full])")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; quick: WORK/results)")
    p.add_argument("--fresh", action="store_true", help="rerun arms that already finished in --work")
    a = p.parse_args(argv)
    q, full = a.quick, a.full
    pick = lambda v, default, quick, gpu=None: v if v is not None else (quick if q else (gpu if full and gpu is not None else default))  # noqa: E731
    a.train_subset = None if full else pick(a.train_subset, 5000, 128)
    a.eval_subset = None if full else pick(a.eval_subset, 2000, 64)
    a.img_size = pick(a.img_size, 112, 56)
    a.batch = pick(a.batch, 64, 16)
    a.dense_epochs = pick(a.dense_epochs, 2.0, 1.0)
    a.budget_images = pick(a.budget_images, 5000, 128, 50000)
    a.isp_learners = pick(a.isp_learners, 3, 2, 5)
    a.isp_fraction = pick(a.isp_fraction, 0.05, 0.25, 0.1)
    a.isp_step = pick(a.isp_step, 0.2, 0.3, 0.1)
    a.round_eval_images = pick(a.round_eval_images, 500, 32, 0) or None
    a.eb_every = pick(a.eb_every, 10, 1, 100)
    a.eb_window = pick(a.eb_window, 5, 3)
    a.isp_start = pick(a.isp_start, "knee", "dense")  # quick: a noisy tiny sweep may put the knee past the targets
    a.targets = [float(x) for x in a.targets.split(",") if x]
    a.skip = {x for x in a.skip.split(",") if x}
    unknown = a.skip - {"oneshot", "isp", "issp", "early_bird"}
    if unknown:
        p.error(f"unknown --skip parts {sorted(unknown)}")
    suffix = "-quick" if q else ("-full" if full else "")
    a.work = a.work or ROOT / "runs" / f"bench-sparsity-soup{suffix}"
    a.out = a.out or (a.work / "results" if q else ROOT / "benchmarks" / "results")
    return a


# ----------------------------------------------------------------------------- recipes


def dense_stages(args, eb_stop: bool = False) -> list[dict]:
    """The dense fine-tune (with early-bird detection) and the sweep: the shared prefix of every arm."""
    eb = {"sparsity": args.eb_sparsity, "every": args.eb_every, "window": args.eb_window,
          "threshold": args.eb_threshold, "stop": eb_stop}
    ft = {"kind": "finetune", "name": "dense_ft", "train": "all", "epochs": args.dense_epochs, "warmup": 0.1,
          "schedule": "cosine", "eval_every_epoch": True, "early_bird": eb, **TRAIN}
    if eb_stop:
        return [ft]
    return [ft, {"kind": "essential_sparsity", "name": "sweep", "tolerance": 1.0}]


def finetune_stage(args, name: str, images: int) -> dict:
    return {"kind": "finetune", "name": name, "train": "all", "steps": max(1, images // args.batch),
            "warmup": 0.1, "schedule": "cosine", "eval_every_epoch": False, **TRAIN}


def soup_stage(args, target: float, combine: str, budget: int) -> dict:
    levels = combine == "union_levels"
    return {
        "kind": "instant_soup", "name": "issp" if levels else "isp", "sparsity": target, "combine": combine,
        "learners": 1 if levels else args.isp_learners, "data_fraction": args.issp_fraction if levels else args.isp_fraction,
        "step": args.isp_step, "stop_within": 0.05, "main_epochs": 1.0, "budget_images": budget,
        "finetune_warmup": 0.1, "eval_rounds": True, "eval_images": args.round_eval_images, **TRAIN,
        **({"round_lr_scale": args.round_lr_scale} if args.round_lr_scale != 1 else {}),
    }


def soup_arm(args, kind: str, tag: str) -> str:
    """Run-directory name of a soup arm: ``isp_60``, or ``isp_60_rls0.1`` with a round learning-rate scale."""
    return f"{kind}_{tag}" + (f"_rls{args.round_lr_scale:g}" if args.round_lr_scale != 1 else "")


def images_of_steps(steps: int, batch: int, n_train: int) -> int:
    """Images a ``steps``-step fine-tune sees (each epoch's last batch may be short)."""
    per_epoch = math.ceil(n_train / batch)
    full, rest = divmod(steps, per_epoch)
    return full * n_train + rest * batch


# ----------------------------------------------------------------------------- running


def _seed_from(src: Path, dst: Path) -> None:
    """Copy a finished run directory: checkpoints hard-linked (written once, never modified), the rest copied."""
    def copy(s, d):
        if s.endswith(".safetensors"):
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)


def run_arm(args, name: str, stages: list[dict], log, seed_dir: Path | None) -> dict:
    """Run (or reuse) one arm; returns ``{"run_dir", "stages": {name: entry}, "wall_s"}``."""
    import torch

    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe, stage_fingerprint

    run_dir = args.work / name
    recipe = parse_recipe({**reference_recipe(args, f"sparsity-soup-{name}"), "stages": stages})
    mpath = run_dir / "manifest.json"
    if mpath.is_file() and not args.fresh:
        old = read_json(mpath)["stages"]
        fps = [stage_fingerprint(recipe, i) for i in range(len(stages))]
        if len(old) == len(stages) and all(e["status"] == "done" and e["fingerprint"] == f for e, f in zip(old, fps)):
            log(f"{name}: reusing finished run {run_dir}")
            return {"run_dir": str(run_dir), "reused": True, "wall_s": sum(e["wall_s"] for e in old), "stages": {e["name"]: e for e in old}}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if seed_dir is not None:
        _seed_from(seed_dir, run_dir)
    log(f"{name}: running into {run_dir}")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    compress(recipe, out=run_dir, resume=seed_dir is not None, quiet=not sys.stderr.isatty())
    entries = read_json(mpath)["stages"]
    return {"run_dir": str(run_dir), "reused": False, "wall_s": time.perf_counter() - t0, "stages": {e["name"]: e for e in entries}}


def _metrics(arm: dict, stage: str) -> dict:
    return arm["stages"][stage]["metrics"]


def main(argv=None) -> int:  # noqa: C901 — one linear script
    args = parse_args(argv)
    missing = missing_shared()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from lotus_deploy.files import write_json, write_text

    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        **results_header("sparsity_soup.py", argv),
        "args": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
    }

    # 1-2. dense fine-tune (+ early-bird record) and the sweep
    dense = run_arm(args, "dense", dense_stages(args), log, None)
    dense_dir = Path(dense["run_dir"])
    d = _metrics(dense, "dense_ft")
    sweep = _metrics(dense, "sweep")
    n_train = args.train_subset or 50000
    res["dense"] = {"top1": d["top1"], "top5": d["top5"], "epochs": args.dense_epochs, "steps": d["early_bird"]["steps_trained"],
                    "history": d["history"], "wall_s": dense["stages"]["dense_ft"]["wall_s"]}
    res["sweep"] = {k: sweep[k] for k in ("dense_top1", "eval_images", "tolerance", "knee", "knee_top1", "knee_curvature",
                                          "knee_curvature_top1", "table", "evaluations", "sweep_wall_s", "eval_s_mean", "cost_ratio")}
    res["sweep"]["wall_s"] = dense["stages"]["sweep"]["wall_s"]
    log(f"dense {d['top1']:.2f}%, knee {sweep['knee']} ({sweep['knee_top1']:.2f}%), curvature knee {sweep['knee_curvature']}")

    # 3. arms per target
    prefix = dense_stages(args)
    start = [{"kind": "magnitude_prune", "name": "knee_prune", "sparsity": "knee"}] if args.isp_start == "knee" else []
    res["targets"] = {}
    for t in args.targets:
        tag = f"{round(100 * t)}"
        row: dict = {"target": t}
        budget = args.budget_images
        if "isp" not in args.skip:
            arm = run_arm(args, soup_arm(args, "isp", tag), prefix + start + [soup_stage(args, t, "union", budget)], log, dense_dir)
            m = _metrics(arm, "isp")
            row["isp"] = _soup_row(m, arm)
            budget = max(budget, m["images_seen"]["total"])
        row["budget_images"] = budget
        if "oneshot" not in args.skip:
            stages = prefix + [{"kind": "magnitude_prune", "name": "oneshot", "sparsity": t}, finetune_stage(args, "recover", budget)]
            arm = run_arm(args, f"oneshot_{tag}", stages, log, dense_dir)
            p, f = _metrics(arm, "oneshot"), _metrics(arm, "recover")
            steps = stages[-1]["steps"]
            row["oneshot"] = {"top1_oneshot": p["top1"], "top1": f["top1"], "sparsity": p["scope_sparsity"],
                              "images_seen": images_of_steps(steps, args.batch, n_train), "finetune_steps": steps,
                              "wall_s": arm["stages"]["oneshot"]["wall_s"] + arm["stages"]["recover"]["wall_s"],
                              "masks_hash": p["masks_hash"]}
        if "issp" not in args.skip:
            arm = run_arm(args, soup_arm(args, "issp", tag), prefix + [{"kind": "magnitude_prune", "name": "knee_prune", "sparsity": "knee"},
                                                        soup_stage(args, t, "union_levels", budget)], log, dense_dir)
            row["issp"] = _soup_row(_metrics(arm, "issp"), arm)
        res["targets"][tag] = row
        log(f"target {t}: " + ", ".join(f"{k} {v['top1']:.2f}%" for k, v in row.items() if isinstance(v, dict)))

    # 4. early bird
    eb = d["early_bird"]
    res["early_bird"] = {k: eb[k] for k in ("sparsity", "every", "window", "threshold", "checks", "drawn", "final_distance", "ticket_masks_hash")}
    res["early_bird"]["draw_at_threshold"] = {
        t: draw_check(eb["checks"], eb["window"], t) for t in sorted({eb["threshold"], 0.1, 0.03, 0.01, 0.003, 0.001}, reverse=True)
    }
    if "early_bird" not in args.skip and eb["drawn"] is not None:
        budget = args.budget_images
        tk = run_arm(args, "eb_ticket", dense_stages(args, eb_stop=True) + [
            {"kind": "magnitude_prune", "name": "ticket_prune", "sparsity": args.eb_sparsity}, finetune_stage(args, "recover", budget)],
            log, None)
        same = res["targets"].get(f"{round(100 * args.eb_sparsity)}", {})
        if "oneshot" in same and same["budget_images"] == budget:  # the final-mask arm is that one-shot arm
            final = {"top1_pruned": same["oneshot"]["top1_oneshot"], "top1": same["oneshot"]["top1"]}
        else:
            fn = run_arm(args, "eb_final", prefix + [
                {"kind": "magnitude_prune", "name": "final_prune", "sparsity": args.eb_sparsity}, finetune_stage(args, "recover", budget)],
                log, dense_dir)
            final = {"top1_pruned": _metrics(fn, "final_prune")["top1"], "top1": _metrics(fn, "recover")["top1"]}
        tkm = _metrics(tk, "dense_ft")["early_bird"]
        res["early_bird"]["arms"] = {
            "ticket": {"dense_steps": tkm["steps_trained"], "top1_pruned": _metrics(tk, "ticket_prune")["top1"],
                       "top1": _metrics(tk, "recover")["top1"], "ticket_reproduced": _metrics(tk, "ticket_prune")["masks_hash"] == eb["ticket_masks_hash"],
                       "dense_top1_at_draw": _metrics(tk, "dense_ft")["top1"]},
            "final": {"dense_steps": eb["steps_trained"], **final},
            "recovery_images": images_of_steps(max(1, budget // args.batch), args.batch, n_train),
        }
    res["wall_s"] = time.perf_counter() - t_start
    res["goals"] = goals(res)
    res["protocol"] = protocol(args, res)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sparsity_soup.json", res)
    write_text(args.out / "sparsity_soup.md", markdown(args, res))
    _plot_sweep(args.out / "sparsity_soup_sweep.png", sweep)
    log(f"results: {args.out / 'sparsity_soup.md'} ({res['wall_s'] / 60:.1f} min)")
    return 0


def draw_check(checks: list[dict], window: int, threshold: float) -> int | None:
    """The check at which a detector with ``threshold`` would draw, from recorded window maxima."""
    for c in checks:
        if c["check"] >= window and c["max_distance"] is not None and c["max_distance"] < threshold:
            return c["check"]
    return None


def _soup_row(m: dict, arm: dict) -> dict:
    keep = ("top1", "top1_before_finetune", "scope_sparsity", "soup_sparsity", "remainder_pruned", "n_rounds", "rounds_converged",
            "images_seen", "finetune_steps", "budget_exceeded", "violations", "union_equals_least_sparse", "level_sparsity", "start_sparsity")
    row = {k: m.get(k) for k in keep}
    row["rounds"] = [{k: r.get(k) for k in ("round", "start_sparsity", "sparsity", "learner_top1", "learner_sparsity", "levels",
                                              "level_sparsity", "combined_top1", "main_top1", "capped_from")} for r in m["rounds"]]
    row["images_total"] = m["images_seen"]["total"]
    row["wall_s"] = sum(e["wall_s"] for n, e in arm["stages"].items() if n in ("isp", "issp", "knee_prune"))
    return row


def _plot_sweep(path: Path, sweep: dict) -> None:
    from lotus_deploy.plots import plot_sweep

    curves: dict = {}
    for r in sweep["table"]:
        curves.setdefault(r["curve"], []).append((r["target"], r["top1"]))
    plot_sweep(path, curves, sweep["dense_top1"], sweep["curves"], sweep["tolerance"],
               title=f"one-shot magnitude sweep ({sweep['eval_images']} eval images)")


# ----------------------------------------------------------------------------- report


def goals(res: dict) -> dict:
    out: dict = {}
    dense = res["dense"]["top1"]
    t60, t50 = res["targets"].get("60"), res["targets"].get("50")
    if t60 and "isp" in t60 and "oneshot" in t60:
        diff = t60["isp"]["top1"] - t60["oneshot"]["top1"]
        out["isp_vs_oneshot_60"] = {"points": diff, "goal": ">= 0", "met": diff >= 0}
    if t50 and "oneshot" in t50:
        gap = dense - t50["oneshot"]["top1"]
        out["oneshot_ft_50_gap"] = {"points": gap, "goal": "<= 0.5", "met": gap <= 0.5}
    if t50 and "isp" in t50:
        gap = dense - t50["isp"]["top1"]
        out["isp_50_gap"] = {"points": gap, "goal": "<= 0.5", "met": gap <= 0.5}
    out["sweep_cost_ratio"] = {"ratio": res["sweep"]["cost_ratio"], "goal": "<= 1.1", "met": res["sweep"]["cost_ratio"] <= 1.1}
    return out


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def markdown(args, res: dict) -> str:  # noqa: C901
    env, sw = res["environment"], res["sweep"]
    L = [
        "# Essential sparsity, Instant Soup Pruning and early-bird tickets" + (" (QUICK SMOKE RUN: numbers mean nothing)" if args.quick else ""),
        "",
        f"Measured {res['date']} on {env.get('gpu') or env['cpu']} ({env['torch_threads']} torch threads), torch {env['torch']}, "
        f"timm {env['timm']}; whole benchmark {res['wall_s'] / 60:.1f} min. Command: `{res['command']}`.",
        "",
        f"## Dense model\n\nFull fine-tune, {args.dense_epochs:g} epoch(s) ({res['dense']['steps']} steps): top-1 **{res['dense']['top1']:.2f}%** "
        f"(top-5 {res['dense']['top5']:.2f}%) on {sw['eval_images']} eval images.",
        "",
        "## One-shot magnitude sweep (global over the blocks' Linear weights, each point from the dense weights)",
        "",
        "| sparsity | top-1 (%) | drop (points) |",
        "|---:|---:|---:|",
    ]
    for r in sw["table"]:
        L.append(f"| {r['target']:.2f} | {r['top1']:.2f} | {r['drop']:+.2f} |")
    L += [
        "",
        f"Knee (largest sparsity within {sw['tolerance']:g} point of dense): **{_f(sw['knee'])}** ({_f(sw['knee_top1'])}%); "
        f"curvature (Kneedle) knee: **{_f(sw['knee_curvature'])}** ({_f(sw['knee_curvature_top1'])}%). "
        f"Sweep wall time {sw['sweep_wall_s']:.0f} s for {sw['evaluations']} evaluations of {sw['eval_s_mean']:.1f} s: "
        f"ratio {sw['cost_ratio']:.3f} (goal ≤ 1.1). Plot: `sparsity_soup_sweep.png`.",
        "",
        "## Pruning at the targets (same post-dense budget in images seen)",
        "",
        "| target | method | sparsity | top-1 before fine-tune (%) | top-1 (%) | Δ dense | images seen | rounds | wall s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense = res["dense"]["top1"]
    names = {"oneshot": "one-shot + fine-tune", "isp": "ISP (union)", "issp": "LOTUS ISSP (union_levels)"}
    for tag, row in res["targets"].items():
        for key in ("oneshot", "isp", "issp"):
            a = row.get(key)
            if not a:
                continue
            before = a.get("top1_oneshot", a.get("top1_before_finetune"))
            sparsity = a.get("sparsity", a.get("scope_sparsity"))
            images = a.get("images_seen") if key == "oneshot" else a["images_total"]
            L.append(f"| {row['target']:.2f} | {names[key]} | {sparsity:.4f} | {_f(before)} | {a['top1']:.2f} | {a['top1'] - dense:+.2f} "
                     f"| {images} | {a.get('n_rounds', '—')} | {a['wall_s']:.0f} |")
    L += ["", "\"top-1 before fine-tune\": one-shot alone for one-shot; after the rounds and the one-shot remainder for the soups.", ""]
    for tag, row in res["targets"].items():
        for key in ("isp", "issp"):
            a = row.get(key)
            if not a:
                continue
            L += [f"### {names[key]} at {row['target']:.2f}: rounds", "",
                  "| round | start | after | learners' top-1 (%) | combined top-1 (%) | main top-1 after training (%) |",
                  "|---:|---:|---:|---|---:|---:|"]
            for r in a["rounds"]:
                accs = ", ".join(f"{x:.1f}" for x in r.get("learner_top1") or [])
                L.append(f"| {r['round']} | {r['start_sparsity']:.4f} | {r['sparsity']:.4f} | {accs} | {_f(r.get('combined_top1'))} | {_f(r.get('main_top1'))} |")
            imgs = a["images_seen"]
            L += ["", f"Images seen: learners {imgs['learners']}, main model {imgs['main']}, fine-tune {imgs['finetune']}"
                  + (" (**over the budget**: the rounds alone used more)" if a.get("budget_exceeded") else "") + "; "
                  f"soup reached {a['soup_sparsity']:.4f}, remainder pruned one-shot {a['remainder_pruned']:.4f}; "
                  f"non-zero masked weights after training: {a['violations']}.", ""]
            if key == "issp" and not a["rounds"]:
                L += ["ISSP ran no round: the knee prune already reached the target.", ""]
            elif key == "issp":
                lv = a["rounds"][0]
                L += [f"ISSP levels {', '.join(f'{x:.3f}' for x in lv.get('levels') or [])}: masks of one model at each level have sparsity "
                      f"{', '.join(f'{x:.4f}' for x in lv.get('level_sparsity') or [])} and top-1 "
                      f"{', '.join(f'{x:.1f}' for x in lv.get('learner_top1') or [])}%; their union equals the least sparse level's mask: "
                      f"**{a.get('union_equals_least_sparse')}** (magnitude masks of one weight set are nested, so the union adds nothing; "
                      "the rest of the way to the target is plain one-shot pruning).", ""]
    eb = res["early_bird"]
    L += ["## Early-bird ticket", "",
          f"Mask: global magnitude at {eb['sparsity']:g} over the blocks' Linear weights, checked every {eb['every']} steps during the "
          f"dense fine-tune; window {eb['window']}, threshold {eb['threshold']:g} (normalized Hamming distance).", "",
          "| check | step | epoch | largest distance in window |", "|---:|---:|---:|---:|"]
    for c in eb["checks"]:
        L.append(f"| {c['check']} | {c['step']} | {c['epoch']:.2f} | {_f(c['max_distance'], '{:.4f}')} |")
    alt = ", ".join(f"{t:g}: check {_f(c, '{}')}" for t, c in eb["draw_at_threshold"].items())
    L += ["", f"Where the ticket would be drawn with other thresholds (same recorded distances, full window): {alt}."]
    if eb["drawn"]:
        L += ["", f"Ticket drawn at check {eb['drawn']['check']} (step {eb['drawn']['step']}, epoch {eb['drawn']['epoch']:.2f}); "
              f"distance from the ticket to the mask at the end of the dense fine-tune: {_f(eb['final_distance'], '{:.4f}')}."]
    else:
        L += ["", "No ticket was drawn during the dense fine-tune."]
    arms = eb.get("arms")
    if arms:
        L += ["", "| mask | dense steps | top-1 when pruned (%) | top-1 after fine-tune (%) |", "|---|---:|---:|---:|",
              f"| early-bird ticket (training stopped at the draw) | {arms['ticket']['dense_steps']} | {arms['ticket']['top1_pruned']:.2f} | {arms['ticket']['top1']:.2f} |",
              f"| final mask (after the whole dense fine-tune) | {arms['final']['dense_steps']} | {arms['final']['top1_pruned']:.2f} | {arms['final']['top1']:.2f} |",
              "", f"Both fine-tuned with {arms['recovery_images']} images after pruning. The early-bird run reproduced the dense run's ticket "
              f"bit for bit: {arms['ticket']['ticket_reproduced']}."]
    g = res["goals"]
    L += ["", "## Goals", ""]
    if "isp_vs_oneshot_60" in g:
        x = g["isp_vs_oneshot_60"]
        L.append(f"- ISP at 60% − one-shot + fine-tune at 60%, same budget: {x['points']:+.2f} points (goal ≥ 0): **{'met' if x['met'] else 'not met'}**.")
    if "oneshot_ft_50_gap" in g:
        x = g["oneshot_ft_50_gap"]
        L.append(f"- Dense − one-shot + fine-tune at 50%: {x['points']:.2f} points (goal ≤ 0.5): **{'met' if x['met'] else 'not met'}**.")
    if "isp_50_gap" in g:
        x = g["isp_50_gap"]
        L.append(f"- Dense − ISP at 50%: {x['points']:.2f} points (goal ≤ 0.5): **{'met' if x['met'] else 'not met'}**.")
    x = g["sweep_cost_ratio"]
    L.append(f"- Sweep wall time / (evaluations × one evaluation): {x['ratio']:.3f} (goal ≤ 1.1): **{'met' if x['met'] else 'not met'}**.")
    L += ["", "## Protocol", ""] + [f"- {p}" for p in res["protocol"]] + [""]
    return "\n".join(L)


def protocol(args, res: dict) -> list[str]:
    subset = ("all 50,000 train / 10,000 test images" if args.full else
              f"class-balanced seeded subsets: {args.train_subset} train / {args.eval_subset} test images (subset seed 0)")
    return [
        f"Data: CIFAR-10 from `../shared/data/cifar10` (JPEG re-encoded), {subset}; training: RandomCrop(32, padding 4) + flip, "
        f"then bicubic resize to {args.img_size} px and ImageNet mean/std.",
        f"Model: `{MODEL}` from `../shared/weights/vit_small_patch14_dinov2.safetensors` (sha256 `{res['weights_sha256']}`) at "
        f"{args.img_size} px, new 10-class head. Seed {args.seed} for every run.",
        f"Training everywhere: AdamW, head lr {TRAIN['lr']:g}, backbone lr {TRAIN['backbone_lr']:g}, weight decay {TRAIN['weight_decay']:g}, "
        f"label smoothing {TRAIN['label_smoothing']:g}, batch {args.batch}. Dense: {args.dense_epochs:g} epoch(s), 10% warm-up then cosine. "
        "Fine-tunes after pruning: 10% warm-up then cosine; soup learners and main-model rounds: constant lr, no warm-up"
        + (f", scaled by {args.round_lr_scale:g} (`round_lr_scale`; the soups' final fine-tune is not scaled)." if args.round_lr_scale != 1 else "."),
        "Pruning scope: the Linear weights of the 12 blocks (qkv, proj, fc1, fc2), global L1 magnitude; sparsity = fraction of those weights set to zero.",
        f"Budget: every arm at a target sees the same number of training images after the dense fine-tune (learners, main-model "
        f"rounds and fine-tune all count): {args.budget_images} by default, raised to ISP's total when its rounds need more.",
        f"ISP: starts from {'the knee prune' if args.isp_start == 'knee' else 'the dense model'}; {args.isp_learners} learners per round on "
        f"{args.isp_fraction:g} of the training images each (own seed), each prunes {args.isp_step:g} of its remaining weights; union of "
        f"their masks; main model trains on {args.isp_fraction:g} of the data per round; rounds stop within 0.05 of the target, the "
        "rest is pruned one-shot, then the fine-tune gets the rest of the budget.",
        f"LOTUS ISSP (`union_levels`): knee prune; one model trained on {args.issp_fraction:g} of the data; masks at 3 levels evenly "
        "spaced from the knee to the target; union; main model trained on the same fraction; rest one-shot; fine-tune with the rest of the budget.",
        f"Per-round accuracies on the first {args.round_eval_images or 'all'} eval images; every final accuracy on all {args.eval_subset or 10000} eval images.",
        f"Early bird: magnitude mask at {args.eb_sparsity:g}, checked every {args.eb_every} steps of the dense fine-tune, window "
        f"{args.eb_window}, threshold {args.eb_threshold:g}. Ticket arm: the dense fine-tune rerun with `stop: true` (same seeds, so the "
        "same trajectory up to the draw), pruned at the drawing check, fine-tuned with the budget; final arm: pruned after the whole dense "
        "fine-tune, same budget.",
        standard_error_line(args.eval_subset or 10000),
    ]


if __name__ == "__main__":
    sys.exit(main())
