"""Instant Soup Pruning as its authors run it against one-shot pruning, under two (or three) cost protocols (issue 15).

Runs the reference benchmark of ``../shared/REFERENCE.md`` (CIFAR-10, DINOv2 ViT-S/14 at 112 px)
through ``lotus_deploy.pipeline.compress`` and writes a results table with its protocol to
``benchmarks/results/sparsity_soup_protocols.md`` (raw numbers in ``sparsity_soup_protocols.json``,
the sweep in ``sparsity_soup_protocols_sweep.png``; ``--name`` changes the stem). The results of
the former protocol (``sparsity_soup.md``: a constant rate in the rounds and a fresh optimizer
each round, the fine-tune getting what the rounds left of one budget) are not rewritten.

1. Dense: full fine-tune of the pretrained model with a new head (``dense``), with early-bird
   detection at ``--eb-sparsity`` every ``--eb-every`` steps (recorded, not stopping).
2. The one-shot magnitude sweep (``essential_sparsity``, 0 .. 0.5) of the dense model and its knee
   (tolerance 1 point) and curvature knee.
3. At each target (default 50 % and 60 %), arms continuing from the dense model:
   - ``oneshot``: one-shot magnitude prune to the target, then fine-tune;
   - ``isp``: Instant Soup Pruning (``combine: union``) as its authors run it: one AdamW and one
     warm-up -> cosine schedule for the main model over its rounds and the fine-tune, learners
     warmed up from zero, the main model on ``--main-fraction`` of the data per round, starting
     dense or at the knee (``--start``);
   - ``issp``: LOTUS's ISSP (``combine: union_levels``, from the knee).

   under the protocols of ``--protocol`` (``both`` by default, the tables side by side):

   (a) equal cost: every arm sees the same number of training images after the dense model
       (learners, main-model rounds and fine-tune all count): ``--budget-images`` if given (the
       soups' fine-tune gets what their rounds leave), else ISP's own total under (b) (the one-
       shot fine-tune is lengthened to it, ISSP's fine-tune gets what its round leaves);
   (b) ISP's own: every arm gets the same fine-tune (``--finetune-epochs``); the soups' rounds
       are extra cost, reported in images and wall time;
   (c) the authors' accounting (``--protocol all`` or ``a,b,c``): the authors' ``isp_all.py``
       counts epochs of the main model only (its per-round share of the data, then the remaining
       epochs of fine-tuning); the learners come on top. The one-shot arm fine-tunes with as
       many images as ISP's main model sees (round segments + fine-tune); ISP's arm is (b)'s.
4. Early bird (``--early-bird``): where the dense run drew the ticket, and a model pruned with the
   ticket then fine-tuned, against the final mask fine-tuned the same way.

Usage::

    python benchmarks/sparsity_soup.py                      # CPU reference: 5,000 / 2,000 images (hours on 2 cores, see README)
    python benchmarks/sparsity_soup.py --start knee --targets 0.6 --protocol both
    python benchmarks/sparsity_soup.py --full               # all 50,000 / 10,000 images (GPU)
    python benchmarks/sparsity_soup.py --quick              # smoke test on tiny subsets at 56 px (numbers mean nothing)

Every arm is its own run directory under ``--work``; arms start from a hard-linked copy of the
dense run (finished stages are reused by fingerprint, so the dense fine-tune and the sweep run
once; ``--dense-from`` copies a finished dense run of the former benchmark in, which is reused
when its stages match), and finished arms are reused on a rerun (``--fresh`` starts over).
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
METHODS = ("oneshot", "isp", "issp")
NAMES = {"oneshot": "one-shot + fine-tune", "isp": "ISP (union)", "issp": "LOTUS ISSP (union_levels)"}
PROTOCOLS = {"a": "(a) equal cost", "b": "(b) ISP's own", "c": "(c) authors' accounting"}
PROTOCOL_SETS = {"both": ["a", "b"], "all": ["a", "b", "c"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 128 train / 64 eval images at 56 px, a tiny soup")
    p.add_argument("--full", action="store_true", help="all 50,000 train / 10,000 test images (for a GPU)")
    p.add_argument("--protocol", default="both",
                   help="comma-separated: a: equal cost (same images seen after the dense model); b: ISP's own (same fine-tune, "
                        "rounds as extra cost); c: the authors' accounting (one-shot fine-tunes as long as ISP's main model trains, "
                        "learners extra); both = a,b; all = a,b,c")
    p.add_argument("--start", choices=["dense", "knee"], help="ISP's rounds start from the dense model or the sweep's knee (default dense, the authors'; ISSP always starts at the knee)")
    p.add_argument("--isp-start", dest="start", choices=["dense", "knee"], help=argparse.SUPPRESS)  # the former name
    p.add_argument("--train-subset", type=int, help="default 5000 (quick 128)")
    p.add_argument("--eval-subset", type=int, help="default 2000 (quick 64)")
    p.add_argument("--img-size", type=int, help="input pixels (default 112; quick 56)")
    p.add_argument("--batch", type=int, help="training batch size (default 64; quick 16)")
    p.add_argument("--dense-epochs", type=float, help="dense fine-tune epochs (default 2; quick 1)")
    p.add_argument("--targets", default="0.5,0.6", help="comma-separated target sparsities")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="(b) and the soups' own fine-tune: epochs over the training subset")
    p.add_argument("--budget-images", type=int, help="(a): post-dense images seen per arm (default: ISP's total under (b))")
    p.add_argument("--isp-learners", type=int, help="learners per round (default 5, the authors'; quick 2)")
    p.add_argument("--isp-fraction", type=float, help="data fraction per learner (default 0.1; quick 0.25)")
    p.add_argument("--isp-step", type=float, help="fraction of remaining weights a learner prunes per round (default 0.1; quick 0.3)")
    p.add_argument("--stop-within", type=float, default=0.05, help="plan rounds until within this of the target; the rest is pruned one-shot (0: the last round reaches the target)")
    p.add_argument("--main-fraction", type=float, default=0.5, help="data fraction the main model trains on per round (ISP's iter_training_ratio)")
    p.add_argument("--issp-fraction", type=float, default=0.1, help="ISSP: data fraction of its one model (LOTUS: 10%%)")
    p.add_argument("--round-eval-images", type=int, help="eval images for per-round accuracies (default 500; full all; quick 32)")
    p.add_argument("--early-bird", action="store_true", help="also run the early-bird ticket arms (a second dense fine-tune)")
    p.add_argument("--eb-sparsity", type=float, default=0.5, help="sparsity of the early-bird mask")
    p.add_argument("--eb-every", type=int, help="early-bird check interval in steps (default 10; full 100; quick 1)")
    p.add_argument("--eb-window", type=int, help="masks in the early-bird window (default 5; quick 3)")
    p.add_argument("--eb-threshold", type=float, default=0.1)
    p.add_argument("--skip", default="", help="comma-separated methods to skip: oneshot, isp, issp")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="run directories (default runs/bench-sparsity-soup-protocols[-quick|-full]; the dense run and sweep are shared)")
    p.add_argument("--dense-from", type=Path,
                   help="a finished dense run to start from (copied, checkpoints hard-linked; used only if its stages match, else rerun); "
                        "default runs/bench-sparsity-soup/dense (the former benchmark's) when it exists; 'none' to train afresh")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; quick: WORK/results)")
    p.add_argument("--name", default="sparsity_soup_protocols", help="stem of the results files")
    p.add_argument("--fresh", action="store_true", help="rerun arms that already finished in --work")
    a = p.parse_args(argv)
    q, full = a.quick, a.full
    pick = lambda v, default, quick, gpu=None: v if v is not None else (quick if q else (gpu if full and gpu is not None else default))  # noqa: E731
    a.train_subset = None if full else pick(a.train_subset, 5000, 128)
    a.eval_subset = None if full else pick(a.eval_subset, 2000, 64)
    a.img_size = pick(a.img_size, 112, 56)
    a.batch = pick(a.batch, 64, 16)
    a.dense_epochs = pick(a.dense_epochs, 2.0, 1.0)
    a.isp_learners = pick(a.isp_learners, 5, 2)
    a.isp_fraction = pick(a.isp_fraction, 0.1, 0.25)
    a.isp_step = pick(a.isp_step, 0.1, 0.3)
    a.round_eval_images = pick(a.round_eval_images, 500, 32, 0) or None
    a.eb_every = pick(a.eb_every, 10, 1, 100)
    a.eb_window = pick(a.eb_window, 5, 3)
    a.start = a.start or "dense"
    a.targets = [float(x) for x in a.targets.split(",") if x]
    a.protocols = PROTOCOL_SETS.get(a.protocol) or [x for x in PROTOCOLS if x in a.protocol.split(",")]
    bad = set(a.protocol.split(",")) - set(PROTOCOLS) if a.protocol not in PROTOCOL_SETS else set()
    if bad or not a.protocols:
        p.error(f"--protocol {a.protocol!r}: unknown {sorted(bad) or 'empty'}; allowed: a, b, c (comma-separated), both, all")
    a.skip = {x for x in a.skip.split(",") if x}
    unknown = a.skip - set(METHODS)
    if unknown:
        p.error(f"unknown --skip methods {sorted(unknown)}; allowed: {', '.join(METHODS)}")
    suffix = "-quick" if q else ("-full" if full else "")
    a.work = a.work or ROOT / "runs" / f"bench-sparsity-soup-protocols{suffix}"
    former = ROOT / "runs" / f"bench-sparsity-soup{suffix}" / "dense"
    a.dense_from = None if str(a.dense_from) == "none" else (a.dense_from or (former if former.is_dir() else None))
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


def finetune_stage(args, name: str, steps: int) -> dict:
    return {"kind": "finetune", "name": name, "train": "all", "steps": max(1, steps),
            "warmup": 0.1, "schedule": "cosine", "eval_every_epoch": False, **TRAIN}


def soup_stage(args, target: float, combine: str, length: dict) -> dict:
    """An instant_soup stage with the authors' protocol; ``length``: ``finetune_epochs`` (b) or ``budget_images`` (a)."""
    levels = combine == "union_levels"
    return {
        "kind": "instant_soup", "name": "issp" if levels else "isp", "sparsity": target, "combine": combine,
        "start": "knee" if levels or args.start == "knee" else "input",
        "learners": 1 if levels else args.isp_learners, "data_fraction": args.issp_fraction if levels else args.isp_fraction,
        "step": args.isp_step, "stop_within": args.stop_within, "main_fraction": args.main_fraction, "main_epochs": 1.0,
        "warmup": 0.1, "schedule": "cosine", "eval_rounds": True, "eval_images": args.round_eval_images, **TRAIN, **length,
    }


def finetune_steps(args, n_train: int) -> int:
    """Steps of ``--finetune-epochs`` over the training subset (as the soup stage counts them)."""
    return int(round(args.finetune_epochs * math.ceil(n_train / args.batch)))


def steps_within(images: int, batch: int, n_train: int) -> int:
    """The most fine-tune steps whose images seen stay within ``images``."""
    from lotus_deploy.prune.soup import images_of_steps

    steps = images // batch
    while steps > 0 and images_of_steps(steps, batch, n_train) > images:
        steps -= 1
    return steps


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


class Arms:
    """The arms of one target, run once each (the same configuration is shared between the protocols)."""

    def __init__(self, args, target: float, prefix: list[dict], dense_dir: Path, n_train: int):
        self.args, self.target, self.prefix, self.dense_dir, self.n_train = args, target, prefix, dense_dir, n_train
        self.tag = f"{round(100 * target)}"

    def oneshot(self, steps: int) -> dict:
        """One-shot prune to the target + a ``steps``-step fine-tune."""
        stages = self.prefix + [{"kind": "magnitude_prune", "name": "oneshot", "sparsity": self.target},
                                finetune_stage(self.args, "recover", steps)]
        arm = run_arm(self.args, f"proto_oneshot_ft{steps}_{self.tag}", stages, log, self.dense_dir)
        from lotus_deploy.prune.soup import images_of_steps

        p, f = _metrics(arm, "oneshot"), _metrics(arm, "recover")
        wall = arm["stages"]["oneshot"]["wall_s"] + arm["stages"]["recover"]["wall_s"]
        images = images_of_steps(steps, self.args.batch, self.n_train)
        return {"top1": f["top1"], "top1_before_finetune": p["top1"], "sparsity": p["scope_sparsity"], "finetune_steps": steps,
                "images_total": images, "images_seen": {"rounds": 0, "finetune": images}, "wall_s": wall,
                "wall_rounds_s": 0.0, "masks_hash": p["masks_hash"], "run_dir": arm["run_dir"]}

    def soup(self, combine: str, length: dict) -> dict:
        """A soup arm: ``length`` is ``{"finetune_epochs": E}`` (b) or ``{"budget_images": T}`` (a)."""
        stage = soup_stage(self.args, self.target, combine, length)
        kind = stage["name"]
        key = f"ft{length['finetune_epochs']:g}" if "finetune_epochs" in length else f"budget{length['budget_images']}"
        start = "knee" if stage["start"] == "knee" else "dense"
        arm = run_arm(self.args, f"proto_{kind}_{start}_{key}_{self.tag}", self.prefix + [stage], log, self.dense_dir)
        return _soup_row(_metrics(arm, kind), arm, kind)


def _soup_row(m: dict, arm: dict, kind: str) -> dict:
    keep = ("top1", "top1_before_finetune", "scope_sparsity", "start_sparsity", "soup_sparsity", "remainder_pruned", "n_rounds",
            "rounds_converged", "images_seen", "finetune_steps", "budget_exceeded", "violations", "union_equals_least_sparse",
            "level_sparsity", "schedule", "wall_s")
    row = {k: m.get(k) for k in keep}
    row["rounds"] = [{k: r.get(k) for k in ("round", "start_sparsity", "sparsity", "learner_top1", "learner_sparsity", "levels",
                                              "level_sparsity", "combined_top1", "main_top1", "capped_from", "learner_images",
                                              "main_images", "round_s", "main_lr")} for r in m["rounds"]]
    seen = m["images_seen"]
    row["images_total"] = seen["total"]
    row["images_seen"] = {"rounds": seen["learners"] + seen["main"], "learners": seen["learners"], "main": seen["main"],
                          "finetune": seen["finetune"]}
    row["wall_rounds_s"] = m["wall_s"]["rounds"]
    row["wall_s"] = arm["stages"][kind]["wall_s"]
    row["run_dir"] = arm["run_dir"]
    return row


def run_target(args, arms: Arms) -> dict:
    """Every arm of one target under the protocols asked for: ``{method: {protocol: row}}`` and the (a) budget."""
    row: dict = {"target": arms.target, **{m: {} for m in METHODS if m not in args.skip}}
    ft_steps = finetune_steps(args, arms.n_train)
    own = None  # ISP under (b): its total sets (a)'s budget when --budget-images is not given
    if "isp" not in args.skip and ("b" in args.protocols or "c" in args.protocols or args.budget_images is None):
        own = arms.soup("union", {"finetune_epochs": args.finetune_epochs})
        if "b" in args.protocols:
            row["isp"]["b"] = own
    if "a" in args.protocols:
        budget = args.budget_images or (own["images_total"] if own else None)
        if budget is None:
            raise SystemExit("--protocol a with --skip isp needs --budget-images")
        row["budget_images"] = budget
        if "isp" not in args.skip:
            row["isp"]["a"] = own if args.budget_images is None else arms.soup("union", {"budget_images": budget})
        if "oneshot" not in args.skip:
            row["oneshot"]["a"] = arms.oneshot(steps_within(budget, args.batch, arms.n_train))
        if "issp" not in args.skip:
            row["issp"]["a"] = arms.soup("union_levels", {"budget_images": budget})
    if "c" in args.protocols:
        if own is None:
            raise SystemExit("--protocol c needs the ISP arm (drop isp from --skip)")
        row["isp"]["c"] = own
        row["budget_images_c"] = own["images_seen"]["main"] + own["images_seen"]["finetune"]
        if "oneshot" not in args.skip:
            row["oneshot"]["c"] = arms.oneshot(steps_within(row["budget_images_c"], args.batch, arms.n_train))
    if "b" in args.protocols:
        if "oneshot" not in args.skip:
            row["oneshot"]["b"] = arms.oneshot(ft_steps)
        if "issp" not in args.skip:
            row["issp"]["b"] = arms.soup("union_levels", {"finetune_epochs": args.finetune_epochs})
    return row


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
    if args.dense_from is not None and args.dense_from.resolve() != (args.work / "dense").resolve() and not (args.work / "dense").exists():
        log(f"dense: copying {args.dense_from} (reused if its stages match this benchmark's, else rerun)")
        _seed_from(args.dense_from, args.work / "dense")
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

    # 3. arms per target and protocol
    prefix = dense_stages(args)
    res["targets"] = {}
    for t in args.targets:
        row = run_target(args, Arms(args, t, prefix, dense_dir, n_train))
        res["targets"][f"{round(100 * t)}"] = row
        log(f"target {t}: " + ", ".join(f"{m} ({p}) {r['top1']:.2f}%" for m in METHODS for p, r in row.get(m, {}).items()))

    # 4. early bird
    if args.early_bird:
        res["early_bird"] = early_bird(args, d, prefix, dense_dir, n_train)
    res["wall_s"] = time.perf_counter() - t_start
    res["goals"] = goals(res)
    res["protocol"] = protocol(args, res)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", res)
    write_text(args.out / f"{args.name}.md", markdown(args, res))
    _plot_sweep(args.out / f"{args.name}_sweep.png", sweep)
    log(f"results: {args.out / (args.name + '.md')} ({res['wall_s'] / 60:.1f} min)")
    return 0


def early_bird(args, d: dict, prefix: list[dict], dense_dir: Path, n_train: int) -> dict:
    """The early-bird ticket (dense rerun stopped at the draw) against the final mask, same fine-tune (``--finetune-epochs``)."""
    from lotus_deploy.prune.soup import images_of_steps

    eb = d["early_bird"]
    out = {k: eb[k] for k in ("sparsity", "every", "window", "threshold", "checks", "drawn", "final_distance", "ticket_masks_hash")}
    out["draw_at_threshold"] = {
        t: draw_check(eb["checks"], eb["window"], t) for t in sorted({eb["threshold"], 0.1, 0.03, 0.01, 0.003, 0.001}, reverse=True)
    }
    if eb["drawn"] is None:
        return out
    steps = finetune_steps(args, n_train)
    tk = run_arm(args, f"proto_eb_ticket_ft{steps}", dense_stages(args, eb_stop=True) + [
        {"kind": "magnitude_prune", "name": "ticket_prune", "sparsity": args.eb_sparsity}, finetune_stage(args, "recover", steps)], log, None)
    fn = run_arm(args, f"proto_eb_final_ft{steps}", prefix + [
        {"kind": "magnitude_prune", "name": "final_prune", "sparsity": args.eb_sparsity}, finetune_stage(args, "recover", steps)],
        log, dense_dir)
    tkm = _metrics(tk, "dense_ft")["early_bird"]
    out["arms"] = {
        "ticket": {"dense_steps": tkm["steps_trained"], "top1_pruned": _metrics(tk, "ticket_prune")["top1"],
                   "top1": _metrics(tk, "recover")["top1"], "ticket_reproduced": _metrics(tk, "ticket_prune")["masks_hash"] == eb["ticket_masks_hash"],
                   "dense_top1_at_draw": _metrics(tk, "dense_ft")["top1"]},
        "final": {"dense_steps": eb["steps_trained"], "top1_pruned": _metrics(fn, "final_prune")["top1"], "top1": _metrics(fn, "recover")["top1"]},
        "recovery_images": images_of_steps(steps, args.batch, n_train),
    }
    return out


def draw_check(checks: list[dict], window: int, threshold: float) -> int | None:
    """The check at which a detector with ``threshold`` would draw, from recorded window maxima."""
    for c in checks:
        if c["check"] >= window and c["max_distance"] is not None and c["max_distance"] < threshold:
            return c["check"]
    return None


def _plot_sweep(path: Path, sweep: dict) -> None:
    from lotus_deploy.plots import plot_sweep

    curves: dict = {}
    for r in sweep["table"]:
        curves.setdefault(r["curve"], []).append((r["target"], r["top1"]))
    plot_sweep(path, curves, sweep["dense_top1"], sweep["curves"], sweep["tolerance"],
               title=f"one-shot magnitude sweep ({sweep['eval_images']} eval images)")


# ----------------------------------------------------------------------------- report


def goals(res: dict) -> dict:
    """ISP at 60 % against one-shot + fine-tune at 60 %, per protocol (goal: ISP ≥ one-shot)."""
    out: dict = {}
    t60 = res["targets"].get("60", {})
    for p in PROTOCOLS:
        isp, one = t60.get("isp", {}).get(p), t60.get("oneshot", {}).get(p)
        if isp and one:
            diff = isp["top1"] - one["top1"]
            out[f"isp_vs_oneshot_60_{p}"] = {"points": diff, "goal": ">= 0", "met": diff >= 0}
    return out


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def _cells(row: dict | None, base: dict | None) -> list[str]:
    if not row:
        return ["—"] * 5
    delta = f"{row['top1'] - base['top1']:+.2f}" if base else "—"
    seen = row["images_seen"]
    images = f"{row['images_total']:,} ({seen['rounds']:,} + {seen['finetune']:,})" + (" **over the budget**" if row.get("budget_exceeded") else "")
    return [f"{row['top1']:.2f}", delta, images, f"{row['wall_s']:.0f}", f"{row['wall_rounds_s']:.0f}"]


def markdown(args, res: dict) -> str:  # noqa: C901
    env, sw = res["environment"], res["sweep"]
    L = [
        "# Instant Soup Pruning as its authors run it, against one-shot pruning: cost protocols side by side"
        + (" (QUICK SMOKE RUN: numbers mean nothing)" if args.quick else ""),
        "",
        f"Measured {res['date']} on {env.get('gpu') or env['cpu']} ({env['torch_threads']} torch threads), torch {env['torch']}, "
        f"timm {env['timm']}; whole benchmark {res['wall_s'] / 60:.1f} min. Command: `{res['command']}`.",
        "",
        f"Dense: full fine-tune, {args.dense_epochs:g} epoch(s) ({res['dense']['steps']} steps): top-1 **{res['dense']['top1']:.2f}%** "
        f"on {sw['eval_images']} eval images. One-shot sweep knee (within {sw['tolerance']:g} point): **{_f(sw['knee'])}** "
        f"({_f(sw['knee_top1'])}%), curvature knee {_f(sw['knee_curvature'])} ({_f(sw['knee_curvature_top1'])}%); "
        "the sweep: `" + f"{args.name}_sweep.png`.",
        "",
        "## The protocols side by side",
        "",
        "(a) equal cost: every arm sees the same training images after the dense model (rounds + fine-tune); "
        "(b) ISP's own: every arm gets the same fine-tune, the soups' rounds are extra; (c) the authors' accounting (where run): "
        "the one-shot fine-tune is as long as ISP's main model trains (its round segments + its fine-tune), the learners are extra. "
        "Images: total (rounds + fine-tune); "
        "wall: the arm's own stages (prune, soup, fine-tune), rounds: the soup rounds' part.",
        "",
        "| target | method | " + " | ".join(f"{PROTOCOLS[p]}: {c}" for p in args.protocols
                                             for c in ("top-1 (%)", "Δ one-shot", "images seen", "wall s", "rounds s")) + " |",
        "|---:|---|" + "---:|" * (5 * len(args.protocols)),
    ]
    for row in res["targets"].values():
        for m in METHODS:
            if m not in row or not row[m]:
                continue
            cells = [c for p in args.protocols for c in _cells(row[m].get(p), row.get("oneshot", {}).get(p) if m != "oneshot" else None)]
            L.append(f"| {row['target']:.2f} | {NAMES[m]} | " + " | ".join(cells) + " |")
    L += [""]
    for row in res["targets"].values():
        if "budget_images" in row:
            L.append(f"- (a) at {row['target']:.2f}: {row['budget_images']:,} images per arm"
                     + (" (`--budget-images`)." if args.budget_images else " (ISP's total under (b))."))
        if "budget_images_c" in row:
            isp = row["isp"]["c"]["images_seen"]
            L.append(f"- (c) at {row['target']:.2f}: the one-shot fine-tune gets {row['budget_images_c']:,} images, as many as ISP's "
                     f"main model ({isp['main']:,} in rounds + {isp['finetune']:,} fine-tune); ISP's learners ({isp['learners']:,} "
                     "images) are extra.")
        for m in ("isp", "issp"):
            b, one = row.get(m, {}).get("b"), row.get("oneshot", {}).get("b")
            if b and one:
                L.append(f"- (b) extra cost of {NAMES[m]} at {row['target']:.2f}: {b['images_seen']['rounds']:,} round images "
                         f"(learners {b['images_seen']['learners']:,}, main model {b['images_seen']['main']:,}), rounds "
                         f"{b['wall_rounds_s']:.0f} s; arm wall time {b['wall_s'] / max(one['wall_s'], 1e-9):.2f} x the one-shot arm's.")
    L += [""]
    for row in res["targets"].values():
        for m in ("isp", "issp"):
            shown = set()
            for a in row.get(m, {}).values():
                if id(a) in shown:
                    continue
                shown.add(id(a))
                both = [q for q, x in row[m].items() if x is a]
                L += [f"### {NAMES[m]} at {row['target']:.2f}, {' and '.join(PROTOCOLS[q] for q in both)}: rounds", ""]
                if not a["rounds"]:
                    L += ["No round: the start was already within 0.05 of the target.", ""]
                else:
                    L += ["| round | start | after | learners' top-1 (%) | combined top-1 (%) | main top-1 after training (%) | images (learners + main) | wall s |",
                          "|---:|---:|---:|---|---:|---:|---:|---:|"]
                    for r in a["rounds"]:
                        accs = ", ".join(f"{x:.1f}" for x in r.get("learner_top1") or [])
                        L.append(f"| {r['round']} | {r['start_sparsity']:.4f} | {r['sparsity']:.4f} | {accs} | {_f(r.get('combined_top1'))} "
                                 f"| {_f(r.get('main_top1'))} | {r['learner_images']} + {r['main_images']} | {r['round_s']:.0f} |")
                    L += [""]
                s = a["schedule"]
                L += [f"Start {a['start_sparsity']:.4f}; soup reached {a['soup_sparsity']:.4f}, remainder pruned one-shot "
                      f"{a['remainder_pruned']:.4f}; top-1 before the fine-tune {_f(a['top1_before_finetune'])}%; fine-tune "
                      f"{a['finetune_steps']} steps ({a['images_seen']['finetune']:,} images)"
                      + (" (**the rounds alone used more than the budget**)" if a.get("budget_exceeded") else "")
                      + f"; the main model's one schedule: {s['total_steps']} steps ({s['warmup_steps']} warm-up, {s['kind']}); "
                      f"non-zero masked weights after training: {a['violations']}.", ""]
                if m == "issp" and a["rounds"]:
                    lv = a["rounds"][0]
                    L += [f"ISSP levels {', '.join(f'{x:.3f}' for x in lv.get('levels') or [])}: their union equals the least sparse "
                          f"level's mask: **{a.get('union_equals_least_sparse')}**.", ""]
    eb = res.get("early_bird")
    if eb and eb.get("arms"):
        arms = eb["arms"]
        L += ["## Early-bird ticket", "",
              "| mask | dense steps | top-1 when pruned (%) | top-1 after fine-tune (%) |", "|---|---:|---:|---:|",
              f"| early-bird ticket (training stopped at the draw) | {arms['ticket']['dense_steps']} | {arms['ticket']['top1_pruned']:.2f} | {arms['ticket']['top1']:.2f} |",
              f"| final mask (after the whole dense fine-tune) | {arms['final']['dense_steps']} | {arms['final']['top1_pruned']:.2f} | {arms['final']['top1']:.2f} |",
              "", f"Both fine-tuned with {arms['recovery_images']:,} images after pruning; ticket reproduced: {arms['ticket']['ticket_reproduced']}.", ""]
    g = res["goals"]
    L += ["## Goals", ""]
    for p in PROTOCOLS:
        x = g.get(f"isp_vs_oneshot_60_{p}")
        if x:
            L.append(f"- {PROTOCOLS[p]}: ISP at 60% − one-shot + fine-tune at 60%: {x['points']:+.2f} points (goal ≥ 0): "
                     f"**{'met' if x['met'] else 'not met'}**.")
    if not g:
        L.append("- ISP at 60% against one-shot + fine-tune at 60%: not measured in this run (needs the 0.6 target, ISP and one-shot).")
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
        f"label smoothing {TRAIN['label_smoothing']:g}, gradient clipping 1.0, batch {args.batch}. Dense: {args.dense_epochs:g} epoch(s), "
        "10% warm-up then cosine. One-shot fine-tunes: 10% warm-up then cosine.",
        f"ISP (the authors' protocol): starts from {'the knee prune' if args.start == 'knee' else 'the dense model'}; "
        f"{args.isp_learners} learners per round, each a copy of the main model trained on {args.isp_fraction:g} of the training images "
        "(own seed) with a fresh AdamW warmed up linearly from zero over its steps, then pruned by "
        f"{args.isp_step:g} of the remaining weights (global magnitude); union of their masks; the main model trains on "
        f"{args.main_fraction:g} of the data per round with ONE AdamW and ONE schedule (10% warm-up then cosine) over all its round "
        f"steps and the fine-tune; rounds planned until within {args.stop_within:g} of the target, the rest pruned one-shot.",
        f"LOTUS ISSP (`union_levels`): knee prune; one model trained on {args.issp_fraction:g} of the data; masks at 3 levels evenly "
        "spaced from the knee to the target; union; the main model trains as in ISP; rest one-shot; fine-tune.",
        f"(a) equal cost: every arm sees {'`--budget-images`' if args.budget_images else 'as many images as ISP under (b)'} after the "
        "dense model (learners, main-model rounds and fine-tune count; a one-shot fine-tune takes the most whole steps within it, "
        f"a soup's fine-tune what its planned rounds leave). (b) ISP's own: every fine-tune is {args.finetune_epochs:g} epoch(s) "
        "over the training subset; the rounds are extra."
        + (" (c) the authors' accounting (their `isp_all.py` counts the main model's epochs: its per-round share of the data "
           "and the remaining fine-tune epochs; learners come on top): the one-shot arm fine-tunes with as many images as ISP's "
           "main model sees in its rounds and fine-tune (the most whole steps within it); the ISP arm is (b)'s." if "c" in args.protocols else ""),
        f"Per-round accuracies on {args.round_eval_images or 'all'} eval images (strided); every final accuracy on all "
        f"{args.eval_subset or 10000} eval images. Wall times are of one session on one machine; compare them as ratios.",
        standard_error_line(args.eval_subset or 10000),
    ]


if __name__ == "__main__":
    sys.exit(main())
