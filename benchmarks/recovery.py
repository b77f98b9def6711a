#!/usr/bin/env python3
"""One recovery epoch after pruning, by criterion, sparsity pattern and distillation (issue 12).

Starts from a finished run whose first stage is the dense fine-tune (the reference protocol:
``benchmarks/recipes/reference_dense.yaml`` -> ``runs/reference``; DINOv2 ViT-S/14 at 112 px,
CIFAR-10 5,000 / 2,000 subsets, seed 0). For every arm the run folder is copied and the arm's
recipe (the run's own recipe plus two stages) runs with ``lotus compress --rerun-from prune``:

    finetune (kept, verified) -> prune (one-shot: 50 % unstructured or 2:4 with permutation,
    criterion magnitude or sparsegpt) -> recover (1 epoch, lr 3e-4 / backbone 1e-5 like the
    chain's recovery, with or without ``distill: {teacher: dense, alpha: 0.5, temperature: 2}``)

so each arm is exactly what a user gets from the recipe. An arm folder that already holds a
finished run is read, not rerun (``--fresh`` reruns). Writes ``recovery.{json,md}`` to ``--out``.

    python benchmarks/recovery.py runs/reference                           # all 8 arms (~70 min on 2 idle cores)
    python benchmarks/recovery.py runs/reference --arms sparsegpt:2:4:distill
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import ROOT, log, results_header, standard_error_line

sys.path.insert(0, str(ROOT))

ALL_ARMS = ",".join(f"{c}:{p}:{d}" for p in ("0.5", "2:4") for c in ("magnitude", "sparsegpt") for d in ("plain", "distill"))
GRANULARITY = {"magnitude": "global", "sparsegpt": "per_layer", "wanda": "per_row"}


def prune_stage(criterion: str, pattern: str) -> dict:
    """The arm's one-shot prune stage: ``magnitude_prune`` at a sparsity or ``semi_structured`` 2:4."""
    if pattern == "2:4":
        return {"kind": "semi_structured", "name": "prune", "permute": True, "criterion": criterion}
    return {"kind": "magnitude_prune", "name": "prune", "sparsity": float(pattern), "criterion": criterion,
            "granularity": GRANULARITY[criterion]}


def pattern_label(pattern: str) -> str:
    """``2:4`` or ``50 % unstructured``."""
    return pattern if pattern == "2:4" else f"{float(pattern):.0%} unstructured"


def recover_stage(distill: bool, lr: float, backbone_lr: float) -> dict:
    """One recovery epoch, optionally distilled from the run's dense model."""
    stage = {"kind": "finetune", "name": "recover", "epochs": 1, "lr": lr, "backbone_lr": backbone_lr}
    if distill:
        stage["distill"] = {"teacher": "dense", "alpha": 0.5, "temperature": 2.0}
    return stage


def run_arm(base: Path, arm_dir: Path, criterion: str, pattern: str, distill: bool, args) -> dict:
    """Run (or read) one arm; returns its row."""
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe, read_yaml

    raw = read_yaml(base / "recipe.yaml")
    raw["stages"] = raw["stages"][:1] + [prune_stage(criterion, pattern), recover_stage(distill, args.lr, args.backbone_lr)]
    raw.pop("bench", None)
    recipe = parse_recipe(raw, f"{base}/recipe.yaml + arm {criterion}:{pattern}:{'distill' if distill else 'plain'}")
    manifest = arm_dir / "manifest.json"
    entries = read_json(manifest)["stages"] if manifest.is_file() else []
    done = len(entries) == 3 and all(e.get("status") == "done" for e in entries)
    if args.fresh or not done:
        if arm_dir.exists():
            shutil.rmtree(arm_dir)
        shutil.copytree(base, arm_dir, ignore=shutil.ignore_patterns(".lock", ".reserve"))
        t0 = time.perf_counter()
        compress(recipe, out=arm_dir, rerun_from="prune", quiet=True)
        log(f"{arm_dir.name}: {time.perf_counter() - t0:.0f} s")
    stages = {e["name"]: e for e in read_json(arm_dir / "manifest.json")["stages"]}
    p, r = stages["prune"], stages["recover"]
    return {
        "criterion": criterion, "pattern": pattern, "distill": distill, "dense_top1": stages["finetune"]["metrics"]["top1"],
        "one_shot_top1": p["metrics"]["top1"], "recovered_top1": r["metrics"]["top1"], "recovered_top5": r["metrics"].get("top5"),
        "scope_sparsity": p["metrics"].get("scope_sparsity"), "prune_s": p["wall_s"], "recover_s": r["wall_s"],
        "eval_images": r["metrics"]["history"][-1]["eval_images"], "run": str(arm_dir),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="finished run whose first stage is the dense fine-tune (e.g. runs/reference)")
    p.add_argument("--arms", default=ALL_ARMS, help="criterion:pattern:plain|distill, comma-separated (pattern: a sparsity or 2:4)")
    p.add_argument("--lr", type=float, default=3e-4, help="recovery head learning rate (the chain's recover stage)")
    p.add_argument("--backbone-lr", type=float, default=1e-5, help="recovery backbone learning rate")
    p.add_argument("--work", type=Path, default=None, help="folder of the arm runs (default RUN-recovery next to RUN)")
    p.add_argument("--fresh", action="store_true", help="rerun arms that already finished")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    from lotus_deploy.files import write_json, write_text

    base = args.run.resolve()
    work = args.work or base.parent / f"{base.name}-recovery"
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    rows = []
    for arm in args.arms.split(","):
        criterion, _, rest = arm.partition(":")
        pattern, _, mode = rest.rpartition(":")
        rows.append(run_arm(base, work / arm.replace(":", "_"), criterion, pattern, mode == "distill", args))
        log(f"{arm}: one-shot {rows[-1]['one_shot_top1']:.2f}% -> recovered {rows[-1]['recovered_top1']:.2f}%")
    head = results_header("recovery.py", argv)
    res = {**head, "run": str(args.run), "rows": rows, "wall_s": time.perf_counter() - t_all,
           "recover": {"epochs": 1, "lr": args.lr, "backbone_lr": args.backbone_lr, "distill": {"teacher": "dense", "alpha": 0.5, "temperature": 2.0}}}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "recovery.json", res)
    from lotus_deploy.recipe import load_recipe

    rec = load_recipe(base / "recipe.yaml")
    env, n, dense = head["environment"], rows[0]["eval_images"], rows[0]["dense_top1"]
    md = [
        "# One recovery epoch after one-shot pruning: criterion x pattern x distillation",
        "",
        f"Command: `{res['command']}` ({res['date']}, wall {res['wall_s']:.0f} s for the arms run now).",
        "",
        f"- model `{rec.model.name}` at {rec.model.img_size or 'its default'} px, pretrained weights sha256 `{head['weights_sha256'][:16]}`; "
        f"dense = `{args.run}` (recipe `{rec.name}`: {rec.stages[0].epochs:g} epochs on {rec.data.train_subset or 'all'} train images, "
        f"class-balanced, subset seed {rec.data.subset_seed}, seed {rec.seed}), top-1 **{dense:.2f} %** on {n} eval images",
        "- each arm: `lotus compress` of the run's recipe + `prune` + `recover` with `--rerun-from prune` on a copy of the run; "
        "prune: `magnitude_prune` at the sparsity (fraction of the block Linears' weights) (magnitude global, sparsegpt per layer, 256 calibration images) "
        "or `semi_structured` 2:4 with permutation; recover: 1 epoch over the train subset, AdamW head lr "
        f"{args.lr:g}, backbone lr {args.backbone_lr:g}, warm-up 0.1 + cosine, label smoothing 0.1; distill: KL to the dense "
        "model's logits at T = 2 mixed 0.5 / 0.5 with the label loss",
        f"- machine: {env['cpu']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}); torch {env['torch']}, timm {env['timm']}; "
        "wall times are under whatever else ran on the machine (see the issue note)",
        "- " + standard_error_line(n),
        "",
        "| criterion | pattern | distill | one-shot top-1 (%) | after 1 epoch (%) | Δ dense (points) | prune stage s (with its eval) | recover stage s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['criterion']} | {pattern_label(r['pattern'])} | {'yes' if r['distill'] else 'no'} | {r['one_shot_top1']:.2f} | "
           f"{r['recovered_top1']:.2f} | {r['recovered_top1'] - r['dense_top1']:+.2f} | {r['prune_s']:.0f} | {r['recover_s']:.0f} |" for r in rows]
    write_text(args.out / "recovery.md", "\n".join(md) + "\n")
    print(args.out / "recovery.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
