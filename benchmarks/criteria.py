#!/usr/bin/env python3
"""One-shot top-1 by pruning criterion (magnitude, wanda, sparsegpt), without fine-tuning (issue 12).

Takes a finished run whose ``dense`` variant is the fine-tuned model (the reference protocol of
``../shared/REFERENCE.md``: DINOv2 ViT-S/14 at 112 px, CIFAR-10 5,000 / 2,000 subsets, seed 0),
prunes the block Linears one-shot from the same dense weights at 30 / 50 / 60 % unstructured and
at 2:4 with each criterion (:mod:`lotus_deploy.prune.criteria`), evaluates without fine-tuning,
and times each criterion: its calibration pass (wanda: input norms; sparsegpt: XᵀX) plus
choosing the masks (and sparsegpt's reconstruction). Writes ``criteria.{json,md}`` to ``--out``
(default ``benchmarks/results``).

    python benchmarks/criteria.py runs/cifar10                          # the reference protocol
    python benchmarks/criteria.py /tmp/demo --eval-images 200 --calibration-images 32 --out /tmp/crit   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import ROOT, log, standard_error_line

sys.path.insert(0, str(ROOT))

DEFAULT_ARMS = "magnitude:global,wanda:global,wanda:per_row,sparsegpt:per_layer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a finished lotus run directory (its `dense` variant is pruned)")
    p.add_argument("--variant", default="dense", help="model state to prune (default dense)")
    p.add_argument("--sparsities", default="0.3,0.5,0.6", help="unstructured sparsities (fractions of the weights in scope)")
    p.add_argument("--arms", default=DEFAULT_ARMS, help="criterion:granularity pairs for the unstructured points")
    p.add_argument("--two-four", default="magnitude,wanda,sparsegpt", help="criteria measured at 2:4 (empty: none)")
    p.add_argument("--scope", default="blocks.*", help="scope patterns, comma-separated")
    p.add_argument("--calibration-images", type=int, default=256, help="train-split images of the calibration pass")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on N eval images evenly strided (default: the run's whole eval split)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="criteria", help="results file stem")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch
    from torch.utils.data import DataLoader, Subset

    from lotus_deploy.files import sha256_file, write_json, write_text
    from lotus_deploy.masks import weight_stats
    from lotus_deploy.prune.calibration import calibrate
    from lotus_deploy.prune.criteria import CRITERIA, apply_pruned_
    from lotus_deploy.prune.semi_structured import eligible_weights
    from lotus_deploy.prune.soup import strided
    from lotus_deploy.run import Run, environment
    from lotus_deploy.scope import select_weights
    from lotus_deploy.stages.common import calibration_batch
    from lotus_deploy.state import RunState
    from lotus_deploy.train import evaluate

    run = Run(args.run)
    state = RunState.from_run(run, args.variant, quiet=True)
    state.stage_name = "criteria"
    model, data = state.model, state.data
    scope = [s for s in args.scope.split(",") if s]
    sparsities = [float(x) for x in args.sparsities.split(",") if x]
    arms = [tuple(a.split(":")) for a in args.arms.split(",") if a]
    two_four = [c for c in args.two_four.split(",") if c]
    for c, g in arms:  # an unknown criterion or granularity fails before any work
        if g not in CRITERIA[c].granularities:
            raise SystemExit(f"--arms {c}:{g}: {c} takes granularity {', '.join(CRITERIA[c].granularities)}")

    ds = data.eval_dataset()
    if args.eval_images is not None and args.eval_images < len(ds):
        ds = Subset(ds, strided(len(ds), args.eval_images))
    loader = DataLoader(ds, batch_size=data.cfg.eval_batch_size or data.cfg.batch_size)

    def top1(desc: str) -> float:
        return evaluate(model, loader, state.device, desc=desc)["top1"]

    params = select_weights(model, scope)
    names = list(params)
    dense = {k: p.detach().clone() for k, p in params.items()}  # every point starts from these

    def restore():
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(dense[k])

    t0 = time.perf_counter()
    dense_top1 = top1("dense")
    log(f"dense top-1 {dense_top1:.2f}% on {len(ds)} eval images")
    images = calibration_batch(state, args.calibration_images)  # decoded once, outside every timing
    bs = data.cfg.eval_batch_size or data.cfg.batch_size
    stats, calib_s = {}, {}
    for statistic in ("norms", "gram"):  # one pass each, so each criterion's cost is its own pass
        stats[statistic] = calibrate(model, names, images.split(bs), statistic, device=state.device)
        calib_s[statistic] = stats[statistic].seconds
        log(f"calibration ({statistic}): {len(images)} images in {calib_s[statistic]:.1f} s")

    def measure(criterion: str, label: str, prune) -> dict:
        crit = CRITERIA[criterion]
        st = stats.get(crit.statistic)
        t = time.perf_counter()
        pruned, targets = prune(crit, st)
        prune_s = time.perf_counter() - t
        apply_pruned_(model, pruned, pruned.masks)
        row = {
            "criterion": criterion, "point": label, "top1": top1(f"{criterion} {label}"),
            "sparsity": weight_stats(model, list(targets))["sparsity"], "layers": len(targets),
            "calibration_s": calib_s[crit.statistic] if crit.statistic else 0.0, "prune_s": prune_s,
        }
        row["criterion_s"] = row["calibration_s"] + prune_s
        restore()
        log(f"{criterion} {label}: top-1 {row['top1']:.2f}% at sparsity {row['sparsity']:.4f} ({row['criterion_s']:.1f} s)")
        return row

    rows = []
    for criterion, granularity in arms:
        for s in sparsities:
            r = measure(criterion, f"{s:g}", lambda crit, st: (crit.prune({k: dense[k] for k in names}, s, granularity, None, st), names))
            rows.append({**r, "granularity": granularity, "target": s})
    eligible, skipped = eligible_weights(model, scope)
    for criterion in two_four:
        r = measure(criterion, "2:4", lambda crit, st: (crit.two_four({k: dense[k] for k in eligible}, None, st), list(eligible)))
        rows.append({**r, "granularity": "2:4", "target": None})
    wall = time.perf_counter() - t0

    env = environment()
    recipe = run.recipe
    weights = recipe.model.weights
    protocol = {
        "run": str(args.run), "variant": args.variant,
        "variant_sha256": run.variants()[args.variant]["artifacts"]["model"]["sha256"],
        "model": recipe.model.name, "img_size": data.spec.height,
        "pretrained_weights": str(weights) if weights else None,
        "pretrained_weights_sha256": sha256_file(weights) if weights and Path(weights).is_file() else None,
        "data": recipe.data.kind, "train_subset": recipe.data.train_subset, "eval_subset": recipe.data.eval_subset,
        "subset_seed": recipe.data.subset_seed, "seed": recipe.seed, "eval_images": len(ds),
        "calibration_images": len(images), "calibration": "train split, eval transform, class-balanced, seeded by subset_seed; one pass",
        "scope": scope, "two_four_layers": len(eligible), "two_four_skipped": skipped, "wall_s": wall,
        "command": "python benchmarks/criteria.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
    }
    try:
        import modelopt

        protocol["environment"]["nvidia_modelopt"] = modelopt.__version__
    except Exception:  # noqa: BLE001 — optional, only recorded
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"protocol": protocol, "dense_top1": dense_top1, "rows": rows})
    write_text(args.out / f"{args.name}.md", report(protocol, dense_top1, rows, sparsities, arms, two_four))
    print(f"wrote {args.out / f'{args.name}.md'}")
    return 0


def report(p: dict, dense_top1: float, rows: list[dict], sparsities: list[float], arms: list, two_four: list[str]) -> str:
    """The results table in markdown, with its protocol."""
    env = p["environment"]
    sha = (p["pretrained_weights_sha256"] or "-")[:16]
    lines = [
        "# One-shot top-1 by pruning criterion (no fine-tune)",
        "",
        f"Command: `{p['command']}` ({p['date']}, wall {p['wall_s']:.0f} s)",
        "",
        f"- model `{p['model']}` at {p['img_size']} px, run `{p['run']}` variant `{p['variant']}` (sha256 `{p['variant_sha256'][:16]}`); pretrained weights sha256 `{sha}`",
        f"- data `{p['data']}`: train subset {p['train_subset']}, eval subset {p['eval_subset']} (class-balanced, subset seed {p['subset_seed']}, run seed {p['seed']}); "
        f"{p['eval_images']} eval images. {standard_error_line(p['eval_images'])}",
        f"- scope `{', '.join(p['scope'])}`; every point pruned one-shot from the same dense weights; 2:4 on {p['two_four_layers']} eligible Linears along K",
        f"- calibration: {p['calibration_images']} train images (eval transform, class-balanced), one forward pass with hooks; wanda uses the input norms, sparsegpt XᵀX (damping 1 %, blocks of 128)",
        f"- machine: {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads); torch {env['torch']}, timm {env['timm']}, "
        f"numpy {env['numpy']}, python {env['python']}" + (f", nvidia-modelopt {env['nvidia_modelopt']} (not used)" if env.get("nvidia_modelopt") else ""),
        "- time = the criterion's calibration pass + choosing the masks (+ sparsegpt's reconstruction), per pruned model; evaluation excluded",
        "",
        f"Dense top-1 **{dense_top1:.2f} %**.",
        "",
        "| criterion | granularity | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " | time per prune (s) |",
        "|---|---|" + "---:|" * (len(sparsities) + 1),
    ]
    for c, g in arms:
        mine = [r for r in rows if r["criterion"] == c and r["granularity"] == g]
        cells = [next((f"{r['top1']:.2f}" for r in mine if r["target"] == s), "-") for s in sparsities]
        secs = sum(r["criterion_s"] for r in mine) / max(len(mine), 1)
        lines.append(f"| {c} | {g} | " + " | ".join(cells) + f" | {secs:.1f} |")
    if two_four:
        lines += ["", "| criterion | 2:4 top-1 % | sparsity in the 2:4 layers | time (s) |", "|---|---:|---:|---:|"]
        for r in rows:
            if r["granularity"] == "2:4":
                lines.append(f"| {r['criterion']} | {r['top1']:.2f} | {r['sparsity']:.4f} | {r['criterion_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
