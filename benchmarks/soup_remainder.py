"""How much a pruned model loses to a little more one-shot pruning, and how the soup's per-round
accuracies (``eval_images`` strided) read against the full eval subset.

Reads a finished run of ``benchmarks/sparsity_soup.py`` (an arm folder with an ``instant_soup``
stage), loads the soup stage's model and masks, and for each ``--extra`` fraction prunes that much
more of the scope by global magnitude (the masks in force stay, as the soup's one-shot remainder
does), evaluates on every eval image and records which layers lost most. It also evaluates the
dense and the soup model on the strided round-evaluation images and on all of them.

    python benchmarks/soup_remainder.py runs/bench-soup-56-knee-sw0/proto_isp_knee_ft1_60 \\
        --name soup_remainder_56px_knee_sw0

Results: ``benchmarks/results/<name>.md`` and ``.json``. One torch thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import ROOT, results_header


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of fractions: {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished arm folder with an instant_soup stage")
    p.add_argument("--extra", type=_fractions, default="0,0.0017,0.0152,0.0324", help="comma-separated fractions of the scope to prune on top")
    p.add_argument("--round-eval-images", type=int, default=500, help="the soup's strided round-evaluation images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="soup_remainder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for f in ("recipe.yaml", "manifest.json"):
        if not (args.run / f).is_file():
            print(f"{args.run}: {f}: not found (expected a finished arm folder of benchmarks/sparsity_soup.py)", file=sys.stderr)
            return 2
    import torch
    import yaml
    from torch.utils.data import DataLoader, Subset

    from lotus_deploy.data import build_data
    from lotus_deploy.files import read_json, write_json, write_text
    from lotus_deploy.masks import apply_masks_, mask_sparsity
    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.prune.magnitude import prune_masks
    from lotus_deploy.prune.soup import strided
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.run import load_checkpoint
    from lotus_deploy.train import evaluate

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recipe = parse_recipe(yaml.safe_load((args.run / "recipe.yaml").read_text()))
    entries = read_json(args.run / "manifest.json")["stages"]
    soup_i = next((i for i, s in enumerate(recipe.stages) if s.kind == "instant_soup"), None)
    if soup_i is None or entries[soup_i]["status"] != "done":
        print(f"{args.run}: recipe.yaml: stages: no finished instant_soup stage", file=sys.stderr)
        return 2
    scope = recipe.stages[soup_i].scope
    target = recipe.stages[soup_i].sparsity

    model = build_model(recipe.model, with_weights=False).eval()
    data = build_data(recipe.data, input_spec(model))
    ds = data.eval_dataset()
    full = DataLoader(ds, batch_size=128)
    sub = DataLoader(Subset(ds, strided(len(ds), args.round_eval_images)), batch_size=128)
    cpu = torch.device("cpu")

    def top1(loader) -> float:
        return evaluate(model, loader, cpu, desc="eval")["top1"]

    readings = []
    for label, entry in (("dense", entries[0]), ("soup, after its fine-tune", entries[soup_i])):
        masks = load_checkpoint(args.run, entry, model, cpu)  # sha256-checked; the soup's masks last
        readings.append({"model": label, "all": top1(full), "strided": top1(sub)})
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for extra in args.extra:
        model.load_state_dict(base)
        new = prune_masks(model, scope, target + extra, "global", masks)
        apply_masks_(model, new)
        lost = sorted(((float(masks[k].float().mean() - v.float().mean()), k) for k, v in new.items()), reverse=True)[:3]
        rows.append({"extra": extra, "sparsity": mask_sparsity(new), "top1": top1(full),
                     "layers_lost_most": [{"layer": k, "fraction": round(d, 4)} for d, k in lost]})

    out = {**results_header("soup_remainder.py", argv), "run": str(args.run), "eval_images": len(ds), "round_eval_images": args.round_eval_images,
           "readings": readings, "remainder": rows, "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", out)
    env = out["environment"]
    md = ["# A little more one-shot pruning on the soup's model, and the round-evaluation subset\n",
          f"Measured {out['date']} on {env.get('cpu', '?')} ({args.threads} torch thread(s)), torch {env.get('torch', '?')}, "
          f"timm {env.get('timm', '?')}; {out['wall_s']:.0f} s. Command: `{out['command']}`. Run: `{args.run}`.\n",
          f"## Top-1 on the {args.round_eval_images} strided round-evaluation images and on all {len(ds)}\n",
          "| model | all (%) | strided (%) | strided − all |", "|---|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['all']:.2f} | {r['strided']:.2f} | {r['strided'] - r['all']:+.2f} |" for r in readings]
    md += [f"\n## Pruning more of the scope by global magnitude (masks in force stay), from the soup's model at {target:g}\n",
           "| extra | sparsity | top-1 (%) | Δ | layers that lost most (fraction of the layer) |", "|---:|---:|---:|---:|---|"]
    t_base = rows[0]["top1"] if rows and rows[0]["extra"] == 0 else None
    for r in rows:
        delta = f"{r['top1'] - t_base:+.2f}" if t_base is not None else "—"
        lost = ", ".join(f"`{x['layer']}` {x['fraction']:.3f}" for x in r["layers_lost_most"])
        md.append(f"| {r['extra']:g} | {r['sparsity']:.4f} | {r['top1']:.2f} | {delta} | {lost} |")
    write_text(args.out / f"{args.name}.md", "\n".join(md) + "\n")
    print(f"results: {args.out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
