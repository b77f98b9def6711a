#!/usr/bin/env python3
"""Per-stage table of a finished chain run (top-1, sparsity, 2:4 layers, wall time) from its manifest.

Writes ``<out>/stages.md`` and copies the run's bench results (results.json, results.csv,
report.md, pareto.png, sparsity.png) next to it, so the README can point at one folder.

    python benchmarks/chain_table.py runs/cifar10 --out benchmarks/results/cifar10_chain
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="", help="a line on the conditions (load, other jobs)")
    args = ap.parse_args()
    from lotus_deploy.files import read_json, write_text
    from lotus_deploy.run import Run

    run = Run(args.run)
    m, env = run.manifest, read_json(args.run / "env.json")
    rows = ["| # | stage | kind | status | top-1 % | scope sparsity | 2:4 layers | wall s |", "|---|---|---|---|---:|---:|---:|---:|"]
    total = 0.0
    for e in m["stages"]:
        mt = e.get("metrics") or {}
        tf = mt.get("two_four_layers")
        tf = len(tf) if isinstance(tf, list) else (tf if isinstance(tf, int) else "")
        top1 = f"{mt['top1']:.2f}" if isinstance(mt.get("top1"), (int, float)) else ""
        sp = f"{mt['scope_sparsity']:.4f}" if isinstance(mt.get("scope_sparsity"), (int, float)) else ""
        total += e.get("wall_s") or 0.0
        rows.append(f"| {e['index'] + 1} | {e['name']} | {e['kind']} | {e['status']} | {top1} | {sp} | {tf} | {e.get('wall_s', 0):.0f} |")
    r = run.recipe
    md = [
        f"# Chain run `{args.run}` (recipe `{r.name}`), stage by stage",
        "",
        f"Command: `lotus compress recipes/cifar10.yaml --set data.root=../shared/data/cifar10 --set model.weights=../shared/weights/vit_small_patch14_dinov2.safetensors --out {args.run}`",
        f"(the resolved recipe is `{args.run}/recipe.yaml`). Model {r.model.name} at {r.model.img_size} px, data {r.data.kind} "
        f"train subset {r.data.train_subset} / eval subset {r.data.eval_subset} (class-balanced, subset seed {r.data.subset_seed}), seed {r.seed}. "
        f"CPU {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads), torch {env['torch']}, timm {env['timm']}, "
        f"onnxruntime {env['onnxruntime']}, TensorRT {env['tensorrt']}. Created {m['created']}.",
        args.note,
        "",
        *rows,
        f"| | total | | | | | | {total:.0f} |",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "stages.md", "\n".join(md) + "\n")
    for f in ("results.json", "results.csv", "report.md", "pareto.png", "sparsity.png"):
        if (args.run / "bench" / f).is_file():
            shutil.copy2(args.run / "bench" / f, args.out / f)
    print(args.out / "stages.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
