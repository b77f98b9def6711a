"""ISP against one-shot pruning over several seeds: one table from the results of several
``benchmarks/sparsity_soup.py`` runs that differ only in ``--seed``.

Each input is a results JSON of ``sparsity_soup.py`` (``--name`` stem, ``.json``). The runs must
share every setting but the seed and where they wrote (``--work``, ``--out``, ``--name``,
``--dense-from``, ``--workers``, ``--device``, ``--fresh``), and each must hold ISP and one-shot at
``--target``. Per seed and protocol the table gives both arms and ISP − one-shot; over the seeds
the mean of each, the sample standard deviation of the difference and its standard error
(sd / √n), next to the binomial standard error of a difference of two arms on the eval subset.

    python benchmarks/soup_seeds.py /tmp/b/s0/x.json /tmp/b/s1/x.json /tmp/b/s2/x.json \\
        --name sparsity_soup_protocols_56px_knee_sw0_seeds

Results: ``benchmarks/results/<name>.md`` and ``.json``. Reads JSON (no model is loaded); bad input is
one line naming the file, field and problem, exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from _common import ROOT, results_header
from sparsity_soup import PROTOCOLS

FREE = {"seed", "work", "out", "name", "dense_from", "workers", "device", "fresh"}  # may differ between the runs


class InputError(Exception):
    """One line: the file, the field and the problem."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="results JSONs of benchmarks/sparsity_soup.py, one per seed")
    p.add_argument("--target", default="60", help="target sparsity in percent, as the results key it (default 60)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="sparsity_soup_protocols_seeds")
    return p.parse_args(argv)


def load(path: Path, target: str) -> dict:
    """One run's numbers at ``target``: ``{"seed", "args", "dense", "knee", "eval_images", "arms": {p: (isp, oneshot)}, ...}``."""
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    for field in ("args", "dense", "sweep", "targets", "environment", "command"):
        if not isinstance(res, dict) or field not in res:
            raise InputError(f"{path}: {field}: missing (expected a results JSON of benchmarks/sparsity_soup.py)")
    row = res["targets"].get(target)
    if row is None:
        raise InputError(f"{path}: targets: no target {target!r} (it has {sorted(res['targets'])})")
    arms = {}
    for p in PROTOCOLS:
        isp, one = row.get("isp", {}).get(p), row.get("oneshot", {}).get(p)
        if isp and one:
            arms[p] = (isp["top1"], one["top1"])
    if not arms:
        raise InputError(f"{path}: targets.{target}: no protocol with both ISP and one-shot")
    isp_any = next(iter(row["isp"].values()))
    return {"path": str(path), "seed": res["args"]["seed"], "args": res["args"], "dense": res["dense"]["top1"],
            "knee": res["sweep"]["knee"], "eval_images": res["sweep"]["eval_images"], "arms": arms,
            "soup_sparsity": isp_any["soup_sparsity"], "n_rounds": isp_any["n_rounds"],
            "top1_before_finetune": isp_any["top1_before_finetune"],
            "cpu": res["environment"].get("gpu") or res["environment"]["cpu"], "threads": res["environment"]["torch_threads"],
            "torch": res["environment"]["torch"], "timm": res["environment"]["timm"], "date": res["date"],
            "command": res["command"], "weights_sha256": res["weights_sha256"], "wall_s": res["wall_s"]}


def check_same(runs: list[dict]) -> None:
    """Raise unless the runs differ only in the free settings and in the seed (each seed once)."""
    first = runs[0]
    for r in runs[1:]:
        for k in sorted(set(first["args"]) | set(r["args"])):
            if k not in FREE and first["args"].get(k) != r["args"].get(k):
                raise InputError(f"{r['path']}: args.{k}: {r['args'].get(k)!r}, but {first['path']} has {first['args'].get(k)!r}")
    seen = set()
    for r in runs:
        if r["seed"] in seen:
            raise InputError(f"{r['path']}: args.seed: seed {r['seed']} given twice")
        seen.add(r["seed"])


def summarize(runs: list[dict]) -> dict:
    """Per protocol over the seeds that measured it: means, the difference's sd and SE, the binomial SE of a difference."""
    out = {}
    for p in PROTOCOLS:
        have = [r for r in runs if p in r["arms"]]
        if not have:
            continue
        diffs = [r["arms"][p][0] - r["arms"][p][1] for r in have]
        mean, sd = statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else None)
        n, images = len(have), have[0]["eval_images"]
        isp_m, one_m = statistics.fmean(r["arms"][p][0] for r in have), statistics.fmean(r["arms"][p][1] for r in have)
        acc = (isp_m + one_m) / 200
        binom = 100 * math.sqrt(2 * acc * (1 - acc) / images / n)  # of the mean difference, from eval sampling alone
        out[p] = {"seeds": [r["seed"] for r in have], "isp_mean": isp_m, "oneshot_mean": one_m, "diff_per_seed": diffs,
                  "diff_mean": mean, "diff_sd": sd, "diff_se": None if sd is None else sd / math.sqrt(n),
                  "binomial_se_of_mean_diff": binom, "goal": ">= 0", "met": mean >= 0}
    return out


def markdown(runs: list[dict], summary: dict, target: str) -> str:
    f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    a0 = runs[0]["args"]
    L = [f"# ISP against one-shot + fine-tune at {target} %, over {len(runs)} seeds", "",
         "Built by `benchmarks/soup_seeds.py` from the results of `benchmarks/sparsity_soup.py` runs that differ only in the "
         "seed (seed of the dense fine-tune, the sweep, the soup and every fine-tune; the data subsets keep subset seed 0). "
         f"Common settings: {a0['img_size']} px, {a0['train_subset']} train / {a0['eval_subset']} eval images, ISP from "
         f"{a0['start']}, stop within {a0['stop_within']}, {a0['isp_learners']} learners x {a0['isp_fraction']}, step "
         f"{a0['isp_step']}, main fraction {a0['main_fraction']}, fine-tune {a0['finetune_epochs']} epoch(s) under (b).", "",
         "## Per seed", "",
         "| seed | dense (%) | knee | ISP rounds | soup sparsity | ISP before fine-tune (%) | "
         + " | ".join(f"{PROTOCOLS[p]}: ISP / one-shot (%) | Δ" for p in summary) + " |",
         "|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(summary)]
    for r in runs:
        cells = []
        for p in summary:
            x = r["arms"].get(p)
            cells += ["—", "—"] if x is None else [f"{x[0]:.2f} / {x[1]:.2f}", f"{x[0] - x[1]:+.2f}"]
        L.append(f"| {r['seed']} | {r['dense']:.2f} | {f(r['knee'])} | {r['n_rounds']} | {r['soup_sparsity']:.4f} | "
                 f"{f(r['top1_before_finetune'])} | " + " | ".join(cells) + " |")
    L += ["", "## Over the seeds", "",
          "| protocol | seeds | ISP mean (%) | one-shot mean (%) | Δ mean | Δ sd | SE of Δ mean (sd/√n) | eval-sampling SE of Δ mean | goal Δ ≥ 0 |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p, s in summary.items():
        L.append(f"| {PROTOCOLS[p]} | {', '.join(str(x) for x in s['seeds'])} | {s['isp_mean']:.2f} | {s['oneshot_mean']:.2f} | "
                 f"**{s['diff_mean']:+.2f}** | {f(s['diff_sd'])} | {f(s['diff_se'])} | {s['binomial_se_of_mean_diff']:.2f} | "
                 f"{'met' if s['met'] else 'not met'} |")
    L += ["", "(a) equal cost: ISP's rounds (learners + main model) and fine-tune see as many training images as one-shot's "
          "fine-tune; (b) ISP's own: the same fine-tune for both, the rounds extra; (c) the authors' accounting: one-shot "
          "fine-tunes as long as ISP's main model trains (rounds + fine-tune), the learners extra.", "",
          "## The runs", ""]
    for r in runs:
        L.append(f"- seed {r['seed']}: `{r['command']}` — {r['date']}, {r['cpu']} ({r['threads']} torch threads), torch "
                 f"{r['torch']}, timm {r['timm']}, {r['wall_s'] / 60:.1f} min; weights sha256 `{r['weights_sha256']}`.")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = sorted((load(p, args.target) for p in args.results), key=lambda r: r["seed"])
        check_same(runs)
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    from lotus_deploy.files import write_json, write_text

    summary = summarize(runs)
    res = {**results_header("soup_seeds.py", argv, weights=False), "target": args.target, "summary": summary,
           "runs": [{k: v for k, v in r.items() if k != "args"} for r in runs], "args": runs[0]["args"]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", res)
    write_text(args.out / f"{args.name}.md", markdown(runs, summary, args.target))
    print(args.out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
