"""Data lottery tickets on the reference benchmark (../shared/REFERENCE.md), issue 4.

Three measurements, written as a table with its protocol to ``benchmarks/results/tickets.md``
(raw numbers in ``tickets.json``, curves in ``tickets.png``):

1. Training-step time (forward + backward + AdamW step, batch 64) at keep 1.0, 0.9, 0.7, 0.5
   with the token-dropping forward. Goal: time(keep) <= (keep + 0.05) x time(1.0).
2. Accuracy after each of epochs 1..5 for keep-0.7 attention tickets, keep-0.7 random patches
   and all patches (``selection: full``), plus the paper's setting (drop 10%, attention and random): each arm
   is one ``lottery_finetune`` stage run by ``lotus_deploy.pipeline.compress`` from the pretrained
   weights, same seeds, subsets and steps. Goals: tickets >= random + 1 point at epoch 5; wall
   time to reach (all patches at epoch 5) - 1 point with tickets <= 0.6 x that with all patches.
3. Sink handling: how much ``sink: normalize`` and ``sink: exclude`` tickets differ (last block
   and mean over blocks, keep 0.9/0.7/0.5) on the first training images.
4. Where the keep-0.7 attention tickets drop patches: per-position drop frequency over the
   training images, from the arm's cached scores (no extra model pass).

Usage::

    python benchmarks/tickets.py                 # CPU reference: 5,000 / 2,000 images (hours)
    python benchmarks/tickets.py --full          # all 50,000 / 10,000 images (GPU)
    python benchmarks/tickets.py --quick         # smoke test on tiny subsets (about 2 minutes)

Finished arms are reused from ``--work`` (rerun with ``--fresh``); ticket scores are cached in
each arm's run directory.
"""

from __future__ import annotations

import argparse
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

# name -> (selection, keep)
ARMS = {
    "attention-0.7": ("attention", 0.7),
    "random-0.7": ("random", 0.7),
    "all-patches": ("full", 1.0),
    "attention-drop0.1": ("attention", 0.9),
    "random-drop0.1": ("random", 0.9),
}
DEFAULT_ARMS = ["attention-0.7", "random-0.7", "all-patches", "attention-drop0.1", "random-drop0.1"]
STEP_KEEPS = [1.0, 0.9, 0.7, 0.5]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 56 px, 32 train / 32 eval images, batch 16, 2 epochs, 2 timed steps")
    p.add_argument("--full", action="store_true", help="all 50,000 train / 10,000 test images (for a GPU)")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated arms from {', '.join(ARMS)}")
    p.add_argument("--epochs", type=int, help="epochs per arm (default 5; quick 2)")
    p.add_argument("--train-subset", type=int, help="default 5000 (quick 32)")
    p.add_argument("--eval-subset", type=int, help="default 2000 (quick 32)")
    p.add_argument("--batch", type=int, help="training batch size (images; default 64, quick 16)")
    p.add_argument("--img-size", type=int, help="input size in pixels (default 112, quick 56)")
    p.add_argument("--step-iters", type=int, help="timed steps per keep and round (default 5; quick 2)")
    p.add_argument("--step-rounds", type=int, help="interleaved timing rounds (default 3; quick 1)")
    p.add_argument("--sink-images", type=int, help="training images for the sink comparison (default 500; quick 16)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: steps, accuracy, sink")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="run directories (default runs/bench-tickets[-quick])")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results; quick: WORK/results)")
    p.add_argument("--fresh", action="store_true", help="rerun arms that already finished in --work")
    a = p.parse_args(argv)
    q = a.quick
    a.epochs = a.epochs or (2 if q else 5)
    a.train_subset = None if a.full else (a.train_subset or (32 if q else 5000))
    a.eval_subset = None if a.full else (a.eval_subset or (32 if q else 2000))
    a.batch = a.batch or (16 if q else 64)
    a.img_size = a.img_size or (56 if q else 112)
    a.step_iters = a.step_iters or (2 if q else 5)
    a.step_rounds = a.step_rounds or (1 if q else 3)
    a.sink_images = a.sink_images or (16 if q else 500)
    a.arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    a.skip = set(x for x in a.skip.split(",") if x)
    suffix = "-quick" if q else ("-full" if a.full else "")
    a.work = a.work or ROOT / "runs" / f"bench-tickets{suffix}"
    a.out = a.out or (a.work / "results" if q else ROOT / "benchmarks" / "results")
    return a


def recipe_dict(args, arm: str) -> dict:
    """The reference recipe with one lottery_finetune stage for ``arm``."""
    selection, keep = ARMS[arm]
    stage = {
        "kind": "lottery_finetune", "name": arm.replace(".", "_"), "train": "all", "epochs": args.epochs,
        "lr": 1e-3, "backbone_lr": 3e-5, "weight_decay": 0.05, "warmup": 0.1, "schedule": "cosine",
        "label_smoothing": 0.1, "selection": selection, "keep": keep, "blocks": "last", "sink": "normalize",
        "scoring": "cached", "eval_tokens": "ticket" if selection == "attention" else "all", "show": 16,
    }
    return {**reference_recipe(args, f"tickets-{arm}"), "stages": [stage]}


# ----------------------------------------------------------------------------- 1. step time


def step_times(args, log) -> list[dict]:
    """Median ms per training step at each keep, interleaved rounds on one real batch."""
    import statistics

    import torch

    from lotus_deploy.data import build_data
    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.prune.tickets import (
        forward_tokens,
        num_kept,
        num_patches,
        select_tickets,
    )
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import resolve_device
    from lotus_deploy.train import autocast as precision
    from lotus_deploy.train import param_groups

    r = parse_recipe(recipe_dict(args, "all-patches"))
    device = resolve_device(r.device)
    torch.manual_seed(args.seed)
    model = build_model(r.model).to(device).train()
    data = build_data(r.data.model_copy(update={"augment": "none"}), input_spec(model))
    x, y = next(iter(data.train_loader(seed=args.seed, batch_size=args.batch)))
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(param_groups(model, "all", 1e-3, 3e-5, 0.05), lr=1e-3)
    P = num_patches(model)
    kept = {k: num_kept(P, k) for k in STEP_KEEPS}  # keep -> K, resolved once
    tables = {k: select_tickets(None, x.shape[0], P, kept[k], "random", args.seed).to(device) for k in STEP_KEEPS}
    autocast = precision(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(idx):
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward_tokens(model, x, idx).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[float, list[float]] = {k: [] for k in STEP_KEEPS}
    for k in STEP_KEEPS:  # warm-up (allocator, kernels) at every shape
        step(tables[k])
    for rnd in range(args.step_rounds):
        for k in STEP_KEEPS:
            sync()
            for _ in range(args.step_iters):
                t0 = time.perf_counter()
                step(tables[k])
                sync()
                times[k].append(1000 * (time.perf_counter() - t0))
        log(f"step time round {rnd + 1}/{args.step_rounds}: " + ", ".join(f"keep {k}: {statistics.median(times[k]):.0f} ms" for k in STEP_KEEPS))
    base = statistics.median(times[1.0])
    rows = []
    for k in STEP_KEEPS:
        K = kept[k]
        ms = statistics.median(times[k])
        rows.append({
            "keep": k, "kept_patches": K, "tokens": K + model.num_prefix_tokens, "ms_per_step": ms,
            "ms_min": min(times[k]), "ms_max": max(times[k]), "ratio": ms / base, "goal": min(1.0, k + 0.05),
            "met": ms / base <= k + 0.05, "steps_timed": len(times[k]),
        })
    return rows


# ----------------------------------------------------------------------------- 2. accuracy per epoch


def run_arm(args, arm: str, log) -> dict:
    """Run (or reuse) one arm; returns its stage metrics and wall time."""
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    run_dir = args.work / arm
    mpath = run_dir / "manifest.json"
    recipe = parse_recipe(recipe_dict(args, arm))
    if mpath.is_file() and not args.fresh:
        entry = read_json(mpath)["stages"][0]
        from lotus_deploy.recipe import stage_fingerprint

        if entry["status"] == "done" and entry["fingerprint"] == stage_fingerprint(recipe, 0):
            log(f"{arm}: reusing finished run {run_dir}")
            return {"arm": arm, "run_dir": str(run_dir), "reused": True, "wall_s": entry["wall_s"], **entry["metrics"]}
    log(f"{arm}: running into {run_dir}")
    t0 = time.perf_counter()
    compress(recipe, out=run_dir, force=True, quiet=not sys.stderr.isatty())
    entry = read_json(mpath)["stages"][0]
    return {"arm": arm, "run_dir": str(run_dir), "reused": False, "wall_s": time.perf_counter() - t0, **entry["metrics"]}


def time_to(arm: dict, target: float, with_scoring: bool) -> float | None:
    """Cumulative training seconds (+ scoring) at the first epoch whose eval top-1 >= target."""
    t = arm.get("score_seconds", 0.0) if with_scoring else 0.0
    for h in arm["history"]:
        t += h["seconds"]
        if h.get("eval_top1", -1) >= target:
            return t
    return None


def goals(arms: dict[str, dict]) -> dict:
    """Issue 4's accuracy and time goals from the arms that ran."""
    out: dict = {}
    att, rnd, full = arms.get("attention-0.7"), arms.get("random-0.7"), arms.get("all-patches")
    if att and rnd:
        d = att["history"][-1]["eval_top1"] - rnd["history"][-1]["eval_top1"]
        out["tickets_minus_random"] = {"points": d, "goal": 1.0, "met": d >= 1.0}
    if att and full:
        target = full["history"][-1]["eval_top1"] - 1.0
        out["target_top1"] = target
        for key, scoring in (("time_ratio", True), ("time_ratio_training_only", False)):
            ta, tf = time_to(att, target, scoring), time_to(full, target, False)
            ratio = None if ta is None or tf is None else ta / tf
            out[key] = {"tickets_s": ta, "all_patches_s": tf, "ratio": ratio, "goal": 0.6, "met": ratio is not None and ratio <= 0.6}
    return out


def position_bias(args, arm: dict) -> dict:
    """Where an attention arm's training tickets drop patches, from its cached scores.

    Returns:
        ``grid``: (rows, cols) fraction of images dropping each patch position; ``positional``:
        share of all dropped patches that lie in the P - K most-dropped positions (1.0 = one
        fixed positional mask for every image; a uniform random choice gives (P - K) / P).
    """
    import math

    from lotus_deploy.files import load_tensors
    from lotus_deploy.prune.tickets import drop_frequency, num_kept, select_tickets

    scores = load_tensors(Path(arm["run_dir"]) / arm["scores_file"])["normalize"]  # (n, P)
    n, P = scores.shape
    K = num_kept(P, ARMS[arm["arm"]][1])
    table = select_tickets(scores, n, P, K, "attention")  # (n, K)
    freq = drop_frequency(table, P)  # (P,)
    positional = (freq.topk(P - K).values.sum() / freq.sum()).item()
    side = math.isqrt(P)
    return {"arm": arm["arm"], "images": n, "patches": P, "kept": K, "grid": freq.view(side, side).tolist(),
            "positional": positional, "positional_chance": (P - K) / P}


# ----------------------------------------------------------------------------- 3. sink comparison


def sink_comparison(args, log) -> list[dict]:
    """normalize vs exclude tickets on the first ``sink_images`` un-augmented training images."""
    from torch.utils.data import Subset

    from lotus_deploy.data import build_data
    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.prune.tickets import (
        num_kept,
        num_patches,
        resolve_blocks,
        score_dataset,
        select_tickets,
        ticket_overlap,
    )
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import resolve_device

    r = parse_recipe(recipe_dict(args, "attention-0.7"))
    device = resolve_device(r.device)
    model = build_model(r.model).to(device).eval()
    data = build_data(r.data.model_copy(update={"augment": "none"}), input_spec(model))
    n = min(args.sink_images, len(data.train))
    ds = Subset(data.train, list(range(n)))
    P = num_patches(model)
    rows = []
    for blocks in ("last", "mean"):
        s = score_dataset(model, ds, resolve_blocks(model, blocks), device, 128, args.workers, desc=f"sink {blocks}")
        for keep in (0.9, 0.7, 0.5):
            K = num_kept(P, keep)
            a, b = (select_tickets(s[m], n, P, K, "attention") for m in ("normalize", "exclude"))
            ov = ticket_overlap(a, b)
            rows.append({"blocks": blocks, "keep": keep, "kept_patches": K, "images": n,
                         "shared": ov["shared"], "images_changed": ov["images_changed"]})
        log(f"sink ({blocks}): " + ", ".join(f"keep {r_['keep']}: {100 * r_['shared']:.1f}% shared" for r_ in rows if r_["blocks"] == blocks))
    return rows


# ----------------------------------------------------------------------------- report


def _f(v, fmt="{:.2f}"):
    return "—" if v is None else fmt.format(v)


def markdown(args, res: dict) -> str:
    env = res["environment"]
    lines = [
        "# Data lottery tickets on the reference benchmark" + (" (QUICK SMOKE RUN: numbers mean nothing)" if args.quick else ""),
        "",
        f"Measured {res['date']} on {env.get('gpu') or env['cpu']} ({env['torch_threads']} torch threads), "
        f"torch {env['torch']}, timm {env['timm']}. Command: `{res['command']}`.",
        "",
    ]
    if res.get("steps"):
        lines += [
            f"## Training-step time (batch {args.batch}, forward + backward + AdamW)",
            "",
            "| keep | kept patches | tokens | ms / step (median) | min – max | ratio to keep 1.0 | goal ≤ | met |",
            "|---:|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        for r in res["steps"]:
            lines.append(
                f"| {r['keep']} | {r['kept_patches']} | {r['tokens']} | {r['ms_per_step']:.0f} | {r['ms_min']:.0f} – {r['ms_max']:.0f} "
                f"| {r['ratio']:.3f} | {r['goal']:.2f} | {'yes' if r['met'] else 'no'} |"
            )
        lines.append("")
    arms = res.get("arms") or {}
    if arms:
        E = max(len(a["history"]) for a in arms.values())
        lines += [
            f"## Eval top-1 (%) after each epoch ({res['eval_images']} eval images, all patches)",
            "",
            "| arm | selection | keep | tokens | " + " | ".join(f"ep {e + 1}" for e in range(E)) + " | train s | scoring s | ticket-eval top-1 |",
            "|---|---|---:|---:|" + "---:|" * E + "---:|---:|---:|",
        ]
        for name, a in arms.items():
            accs = [_f(h.get("eval_top1")) for h in a["history"]] + ["—"] * (E - len(a["history"]))
            lines.append(
                f"| {name} | {a['selection']} | {a['keep']:.3f} | {a['kept_patches'] + a['prefix_tokens']} | " + " | ".join(accs)
                + f" | {a['train_seconds']:.0f} | {_f(a.get('score_seconds'), '{:.0f}')} | {_f(a.get('ticket_top1'))} |"
            )
        lines.append("")
        g = res.get("goals", {})
        lines += ["## Goals", ""]
        if "tickets_minus_random" in g:
            t = g["tickets_minus_random"]
            lines.append(f"- Attention tickets − random patches at the last epoch (keep 0.7): {t['points']:+.2f} points "
                         f"(goal ≥ +1): **{'met' if t['met'] else 'not met'}**.")
        if "time_ratio" in g:
            for key, what in (("time_ratio", "scoring pass included"), ("time_ratio_training_only", "training only")):
                t = g[key]
                lines.append(
                    f"- Wall time to reach all-patches − 1 point ({g['target_top1']:.2f}%), tickets / all patches, {what}: "
                    f"{_f(t['tickets_s'], '{:.0f}')} s / {_f(t['all_patches_s'], '{:.0f}')} s = {_f(t['ratio'], '{:.3f}')} "
                    f"(goal ≤ 0.6): **{'met' if t['met'] else 'not met'}**."
                )
        lines.append("")
    pb = res.get("position_bias")
    if pb:
        side = len(pb["grid"])
        lines += [
            f"## Where {pb['arm']} drops patches ({pb['images']} training images, {pb['patches'] - pb['kept']} of {pb['patches']} dropped each)",
            "",
            "Fraction of images that drop each patch position (rows top to bottom, as in the image):",
            "",
            "| row | " + " | ".join(f"c{c}" for c in range(side)) + " |",
            "|---:|" + "---:|" * side,
        ]
        lines += [f"| r{r} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for r, row in enumerate(pb["grid"])]
        lines += [
            "",
            f"{100 * pb['positional']:.1f}% of the dropped patches lie in the {pb['patches'] - pb['kept']} most-dropped positions "
            f"(one fixed positional mask: 100%; uniform random: {100 * pb['positional_chance']:.1f}%).",
            "",
        ]
    if res.get("sink"):
        lines += [
            "## Sink handling: normalize (LOTUS) vs exclude (Data-LTH)",
            "",
            "| blocks | keep | kept patches | images | kept patches shared | images whose ticket changes |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in res["sink"]:
            lines.append(f"| {r['blocks']} | {r['keep']} | {r['kept_patches']} | {r['images']} | {100 * r['shared']:.1f}% | {100 * r['images_changed']:.1f}% |")
        lines += [
            "",
            "Within one head both modes rank patches identically (renormalizing a row is a constant factor); they differ",
            "only through the average over heads (and blocks): `normalize` gives every head equal weight, `exclude` lets",
            "heads that send most of the CLS row to the sink count less.",
            "",
        ]
    lines += ["## Protocol", ""] + [f"- {p}" for p in res["protocol"]] + [""]
    return "\n".join(lines)


def protocol(args) -> list[str]:
    g = args.img_size // 14
    subset = "all 50,000 train / 10,000 test images" if args.full else f"class-balanced seeded subsets: {args.train_subset} train / {args.eval_subset} test images (subset seed 0)"
    return [
        f"Data: CIFAR-10 from `../shared/data/cifar10` (JPEG re-encoded), {subset}; 32 px → bicubic {args.img_size} px → ImageNet mean/std.",
        f"Model: `{MODEL}` from `../shared/weights/vit_small_patch14_dinov2.safetensors` at {args.img_size} px ({g}×{g} = {g * g} patches + CLS), new 10-class head.",
        f"Every arm is one `lottery_finetune` stage run by `lotus_deploy.pipeline.compress` from the same pretrained weights, seed {args.seed}: "
        f"AdamW (head lr 1e-3, backbone lr 3e-5, weight decay 0.05), 10% warm-up then cosine over {args.epochs} epochs, label smoothing 0.1, "
        f"batch {args.batch}; same subsets, shuffling seeds and number of steps (a token-dropped image counts as one image).",
        "Augmentation: none in every arm. With cached ticket scores random crop/flip would misalign scores and patches, so the stage "
        "trains on un-augmented images (REFERENCE.md's dense baseline uses crop + flip; its numbers are not directly comparable).",
        "Tickets: teacher = the pretrained model entering the stage; CLS attention of the last block averaged over heads, "
        f"`sink: normalize`; K = ceil(keep × {g * g}) patches per image, CLS always kept; scores computed once and cached; random arms "
        "draw new patches each epoch (seeded). `all-patches` runs the same token-dropping forward with every patch.",
        "Evaluation after every epoch on all patches of the eval images; attention arms also on the teacher's tickets of the eval images.",
        "Train seconds = training loops only (no evaluation); scoring seconds = the one teacher pass over the training images (attention arms). "
        "Time to target is read at epoch ends (first epoch whose eval top-1 reaches the target).",
        f"Step time: one real batch of {args.batch}, random tickets at each keep, one warm-up step per keep, then {args.step_rounds} "
        f"interleaved round(s) of {args.step_iters} timed steps per keep; median reported.",
        standard_error_line(args.eval_subset or 10000),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_shared()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from lotus_deploy.files import write_json, write_text

    args.work.mkdir(parents=True, exist_ok=True)
    res: dict = {
        **results_header("tickets.py", argv),
        "quick": args.quick,
        "eval_images": "10000" if args.full else args.eval_subset,
    }
    if "sink" not in args.skip:
        res["sink"] = sink_comparison(args, log)
    if "steps" not in args.skip:
        res["steps"] = step_times(args, log)
    if "accuracy" not in args.skip:
        res["arms"] = {}
        for arm in args.arms:
            res["arms"][arm] = run_arm(args, arm, log)
            h = res["arms"][arm]["history"]
            log(f"{arm}: " + ", ".join(f"ep {x['epoch']} {x.get('eval_top1', float('nan')):.2f}%" for x in h))
        res["goals"] = goals(res["arms"])
        if "attention-0.7" in res["arms"]:
            res["position_bias"] = position_bias(args, res["arms"]["attention-0.7"])
    res["protocol"] = protocol(args)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "tickets.json", res)
    write_text(args.out / "tickets.md", markdown(args, res))
    if res.get("arms"):
        plot(args.out / "tickets.png", res["arms"])
    log(f"results: {args.out / 'tickets.md'}")
    return 0


def plot(path: Path, arms: dict) -> Path:
    """Eval top-1 against epoch and against cumulative training seconds, one line per arm."""
    from lotus_deploy.plots import new_figure, save_figure

    fig = new_figure(9.6, 3.6)
    a, b = fig.subplots(1, 2)
    for name, arm in arms.items():
        ep = [h["epoch"] for h in arm["history"] if "eval_top1" in h]
        acc = [h["eval_top1"] for h in arm["history"] if "eval_top1" in h]
        t, cum = arm.get("score_seconds", 0.0), []
        for h in arm["history"]:
            t += h["seconds"]
            if "eval_top1" in h:
                cum.append(t)
        a.plot(ep, acc, "o-", ms=3.5, label=name)
        b.plot(cum, acc, "o-", ms=3.5, label=name)
    a.set(xlabel="epoch", ylabel="eval top-1 (%)")
    b.set(xlabel="training seconds (+ scoring)", ylabel="eval top-1 (%)")
    a.xaxis.get_major_locator().set_params(integer=True)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
