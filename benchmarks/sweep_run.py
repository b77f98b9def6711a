#!/usr/bin/env python3
"""Essential-sparsity sweep (and one-shot + fine-tune arms) on a finished run's dense model.

Reuses a run's fine-tuned dense checkpoint instead of training a new one, so the sweep costs
only its evaluations. Protocol, table and plot go to ``benchmarks/results/sweep_<run>.{md,json,png}``.

    python benchmarks/sweep_run.py runs/cifar10 --variant dense --targets 0.5,0.6 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished lotus run directory")
    ap.add_argument("--variant", default="dense", help="model state to sweep (default dense)")
    ap.add_argument("--sparsities", default=",".join(f"{0.05 * i:.2f}" for i in range(1, 13)), help="sweep points")
    ap.add_argument("--tolerance", type=float, default=1.0, help="allowed top-1 drop at the knee (points)")
    ap.add_argument("--targets", default="0.5,0.6", help="one-shot + fine-tune arms (sparsities)")
    ap.add_argument("--finetune-epochs", type=float, default=0.0, help="epochs of recovery per arm (0: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import torch

    from lotus_deploy.files import sha256_file, write_json, write_text
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.prune.magnitude import prune_masks
    from lotus_deploy.recipe.stages import EssentialSparsity, Finetune
    from lotus_deploy.run import Run, environment
    from lotus_deploy.stages import stage_fn
    from lotus_deploy.stages.common import mask_report, run_training
    from lotus_deploy.state import RunState

    run = Run(args.run)
    state = state0 = RunState.from_run(run, args.variant)
    tag = run.recipe.name
    work = Path("runs") / f"sweep-{tag}"
    shutil.rmtree(work, ignore_errors=True)
    state.stage_dir = work / "sweep"
    state.stage_dir.mkdir(parents=True)
    state.stage_name = "sweep"
    cfg = EssentialSparsity(sparsities=[float(x) for x in args.sparsities.split(",")], tolerance=args.tolerance)
    t0 = time.perf_counter()
    res = stage_fn(cfg)(cfg, state)
    m = res.metrics
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"sweep_{tag}.png"
    shutil.copyfile(res.artifacts["sweep_png"], png)

    # One-shot + fine-tune arms from the same dense weights, fine-tuned like the run's recovery stage.
    recover = next((s for s in run.recipe.stages if s.kind == "finetune" and s.name != run.recipe.stages[0].name), None)
    arms = []
    dense_sd = copy.deepcopy(state0.model.state_dict())
    for target in [float(x) for x in args.targets.split(",") if x]:
        state.model.load_state_dict(dense_sd)
        state.masks = prune_masks(state.model, ["blocks.*"], target, "global")
        apply_masks_(state.model, state.masks)
        one = state.evaluate(desc=f"one-shot {target}")
        arm = {"target": target, "oneshot_top1": one["top1"], **{k: v for k, v in mask_report(state, ["blocks.*"]).items() if k != "masks_hash"}}
        if args.finetune_epochs > 0:
            ft = Finetune(**{**(recover.model_dump(exclude={"name", "kind", "early_bird"}) if recover else {}), "epochs": args.finetune_epochs, "eval_every_epoch": False})
            state.stage_name, state.stage_index = f"oneshot{int(target * 100)}_ft", 100 + int(target * 100)
            t1 = time.perf_counter()
            _, final = run_training(ft, state)
            arm.update(finetuned_top1=final["top1"], finetune_epochs=args.finetune_epochs, finetune_s=time.perf_counter() - t1,
                       zeros_kept=mask_report(state, ["blocks.*"])["scope_sparsity"])
        arms.append(arm)
        print(json.dumps(arm), flush=True)
    wall = time.perf_counter() - t0

    env = environment()
    weights = run.recipe.model.weights
    protocol = {
        "run": str(args.run), "variant": args.variant,
        "variant_sha256": run.variants()[args.variant]["artifacts"]["model"]["sha256"],
        "model": run.recipe.model.name, "img_size": run.recipe.model.img_size,
        "pretrained_weights_sha256": sha256_file(weights) if weights and Path(weights).is_file() else None,
        "train_subset": run.recipe.data.train_subset, "eval_subset": run.recipe.data.eval_subset,
        "subset_seed": run.recipe.data.subset_seed, "seed": run.recipe.seed,
        "eval_images": m["eval_images"], "tolerance": args.tolerance, "scope": ["blocks.*"], "granularity": "global",
        "finetune": (recover.model_dump(mode="json", exclude={"early_bird"}) | {"epochs": args.finetune_epochs}) if recover and args.finetune_epochs else None,
        "wall_s": wall, "sweep_cost_ratio": m["cost_ratio"],
        "cpu": env["cpu"], "cpu_count": env["cpu_count"], "torch_threads": torch.get_num_threads(),
        "torch": env["torch"], "timm": env["timm"],
    }
    write_json(args.out / f"sweep_{tag}.json", {"protocol": protocol, "sweep": m["table"], "knees": m["curves"], "arms": arms})
    lines = [
        f"# Essential-sparsity sweep on `{args.run}` ({args.variant})",
        "",
        f"Command: `python benchmarks/sweep_run.py {args.run} --variant {args.variant} --targets {args.targets} --finetune-epochs {args.finetune_epochs:g}`",
        "",
        f"- model `{protocol['model']}` at {protocol['img_size']} px; variant sha256 `{protocol['variant_sha256'][:16]}`; pretrained weights sha256 `{(protocol['pretrained_weights_sha256'] or '-')[:16]}`",
        f"- data: train subset {protocol['train_subset']}, eval subset {protocol['eval_subset']} (class-balanced, seed {protocol['subset_seed']}); {m['eval_images']} eval images (1 image = {100 / m['eval_images']:.2f} points)",
        "- one-shot global L1 magnitude over the block Linears (`blocks.*`), every point from the same dense weights",
        f"- machine: {env['cpu']} ({env['cpu_count']} cores, {protocol['torch_threads']} torch threads), torch {env['torch']}, timm {env['timm']}; wall {wall:.0f} s",
        f"- sweep cost: {m['evaluations']} evaluations in {m['sweep_wall_s']:.1f} s = {m['cost_ratio']:.3f} x (points x one evaluation)",
        "",
        "| sparsity | top-1 % | drop (points) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['target']:.2f} | {r['top1']:.2f} | {r['drop']:+.2f} |" for r in m["table"]]
    lines += [
        "",
        f"Dense {m['dense_top1']:.2f} %. Knee within {args.tolerance:g} point: **{m['knee']}** ({m['knee_top1']}); curvature (Kneedle) knee: **{m['knee_curvature']}** ({m['knee_curvature_top1']}).",
    ]
    if arms:
        lines += ["", "| target | one-shot top-1 % | one-shot + fine-tune top-1 % | fine-tune epochs | scope sparsity after |", "|---:|---:|---:|---:|---:|"]
        for a in arms:
            lines.append(f"| {a['target']:.2f} | {a['oneshot_top1']:.2f} | {a.get('finetuned_top1', float('nan')):.2f} | {a.get('finetune_epochs', 0):g} | {a.get('zeros_kept', a['scope_sparsity']):.4f} |")
    write_text(args.out / f"sweep_{tag}.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / f'sweep_{tag}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
