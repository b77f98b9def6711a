#!/usr/bin/env python3
"""Two ways a chain can reach 2:4, one-shot (issue 12 item 3), on a finished chain run.

From the same checkpoint (default: the run's ``tickets`` variant, the model and unstructured soup
mask entering the chain's ``semi_structured`` stage) the ``semi_structured`` stage runs with
``earlier_mask: within`` (2 of 4 among the weights the earlier mask kept: the layer ends sparser
than 50 %) and ``earlier_mask: revive`` (2 of 4 among all weights: the earlier zeros lose first,
groups with fewer than 2 survivors bring zeros back), for each criterion, and the model is
evaluated right after (no recovery). Writes ``two_four_paths.{json,md}``.

    python benchmarks/two_four_paths.py runs/cifar10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, log, standard_error_line

sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--variant", default="tickets", help="checkpoint entering 2:4 (default: the chain's tickets stage)")
    p.add_argument("--criteria", default="magnitude,sparsegpt")
    p.add_argument("--permute", action="store_true", default=True)
    p.add_argument("--no-permute", dest="permute", action="store_false")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    import torch

    from lotus_deploy.files import write_json, write_text
    from lotus_deploy.recipe.stages import SemiStructured
    from lotus_deploy.run import Run, environment
    from lotus_deploy.stages import stage_fn
    from lotus_deploy.state import RunState

    run = Run(args.run)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for criterion in args.criteria.split(","):
            for mode in ("within", "revive"):
                state = RunState.from_run(run, args.variant, quiet=True)
                state.stage_dir, state.stage_name, state.stage_index = Path(tmp), f"2:4 {criterion} {mode}", 5
                cfg = SemiStructured(name="two_four", permute=args.permute, criterion=criterion, earlier_mask=mode)
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=[]):
                    m = stage_fn(cfg)(cfg, state).metrics
                rows.append({"criterion": criterion, "earlier_mask": mode, "top1": m["top1"], "scope_sparsity": m["scope_sparsity"],
                             "two_four_sparsity": m["two_four_sparsity"], "kept_magnitude": m["kept_magnitude"],
                             "seconds": time.perf_counter() - t0})
                log(f"{criterion} {mode}: top-1 {m['top1']:.2f}% at scope sparsity {m['scope_sparsity']:.4f}")
        entering = RunState.from_run(run, args.variant, quiet=True)
        base = entering.evaluate()
    env = environment()
    n = base["images"]
    res = {"run": str(args.run), "variant": args.variant, "entering_top1": base["top1"], "eval_images": n, "permute": args.permute,
           "rows": rows, "environment": env,
           "command": "python benchmarks/two_four_paths.py " + " ".join(argv or sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "two_four_paths.json", res)
    md = [
        "# 2:4 inside the earlier mask (within) or chosen afresh (revive), one-shot",
        "",
        f"Command: `{res['command']}`. Run `{args.run}` (recipe `{run.recipe.name}`, model {run.recipe.model.name} at "
        f"{run.recipe.model.img_size or 'its default'} px), from its `{args.variant}` checkpoint (top-1 {base['top1']:.2f}% on {n} eval images, "
        f"subset seed {run.recipe.data.subset_seed}); permutation {'on' if args.permute else 'off'}; no recovery fine-tune. "
        f"CPU {env['cpu']} ({env['cpu_count']} cores, torch threads {env['torch_threads']}), torch {env['torch']}, timm {env['timm']}.",
        standard_error_line(n),
        "",
        "| criterion | earlier mask | top-1 (%) | scope sparsity | sparsity of the 2:4 layers | kept |w| | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['criterion']} | {r['earlier_mask']} | {r['top1']:.2f} | {r['scope_sparsity']:.4f} | {r['two_four_sparsity']:.4f} | "
           f"{r['kept_magnitude']:.4f} | {r['seconds']:.0f} |" for r in rows]
    write_text(args.out / "two_four_paths.md", "\n".join(md) + "\n")
    print(args.out / "two_four_paths.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
