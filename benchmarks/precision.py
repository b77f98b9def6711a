"""ONNX precisions of a finished run on the CPU: accuracy against fp32 and ONNX Runtime latency.

For ``runs/<name>`` (its ``final`` variant, or ``--variant``): the fp32 ONNX is exported into
``<run>/precision/`` (checked against PyTorch as the export stage does), then converted to each
precision by the export's precision step (:mod:`lotus_deploy.export.precision`: ModelOpt
AutoCast for fp16/bf16, ModelOpt Q/DQ post-training quantization for int8/fp8 calibrated on
``export.calibration_images`` train images). Each precision is measured on the whole eval split
against the fp32 ONNX: its top-1, top-1 agreement, max logit difference, and whether it is within
the export's tolerance (:data:`lotus_deploy.export.precision.TOLERANCES`).

Latency: ONNX Runtime CPU, one session per precision with ``--threads`` intra-op threads, every
(precision, batch) arm interleaved in one timing run (:func:`lotus_deploy.bench.timing.time_arms`:
warm-up, then rounds rotating the arms), median ms per call on random inputs of the model's
shape. bf16 has no ONNX Runtime CPU kernels (Conv, Expand): its accuracy comes from the ONNX
reference evaluator and it gets no latency. The CPU model and its VNNI / AMX flags (ONNX Runtime's
int8 GEMMs use them where present) are read from ``/proc/cpuinfo``.

Writes ``benchmarks/results/precision_<run>.{json,md}``. Needs the ``precision`` extra.

    .venv/bin/python benchmarks/precision.py runs/demo-prec [--precisions fp16,bf16,int8] [--batches 1,8,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import log  # noqa: E402  (this folder is on sys.path when run as a script)

PERMISSIVE = dict(min_agreement=0.0, max_top1_drop=math.inf, max_rel_diff=math.inf)


def accuracy(state, onnx_path: Path, precisions: list[str]) -> dict[str, dict]:
    """precision -> metrics of the precision step (permissive tolerance; ``within_tolerance`` judged after)."""
    from lotus_deploy.export.precision import (
        TOLERANCES,
        PrecisionCheckError,
        Tolerance,
        precision_for_state,
        tolerance_problems,
    )

    out = {}
    for p in precisions:
        log(f"precision: converting and checking {p}")
        try:
            m, arts = precision_for_state(state, onnx_path, p, tolerance=Tolerance(**PERMISSIVE))
        except PrecisionCheckError as e:  # non-finite logits or 2:4 lost: recorded, the others go on
            out[p] = {"error": str(e)}
            continue
        problems = tolerance_problems(m, TOLERANCES[p])
        out[p] = {**{k: m[k] for k in ("runtime", "images", "top1", "top1_fp32", "top1_drop", "top1_agreement", "max_abs_diff", "max_rel_diff",
                                      "calibration_images", "bytes", "two_four")},
                  "tolerance": vars(TOLERANCES[p]), "within_tolerance": not problems, "problems": problems,
                  "onnx": str(arts[f"onnx_{p}"])}
    return out


def latency(paths: dict[str, Path], chw: tuple[int, int, int], batches: list[int], threads: int, warmup: int, iters: int, rounds: int) -> dict:
    """(precision, batch) -> latency stats (ms) on ONNX Runtime CPU, all arms interleaved; skipped precisions with the reason."""
    import numpy as np

    from lotus_deploy.bench.timing import Timed, time_arms
    from lotus_deploy.runtime import ort_session

    arms, skipped = {}, {}
    rng = np.random.default_rng(0)
    for p, path in paths.items():
        try:
            sess = ort_session(path, threads=threads)
        except Exception as e:  # noqa: BLE001 — ONNX Runtime has no CPU kernel for some types (bf16)
            skipped[p] = " ".join(str(e).split())[:200]
            continue
        name = sess.get_inputs()[0].name
        for b in batches:
            x = rng.standard_normal((b, *chw), dtype=np.float32)  # (B, C, H, W)
            arms[f"{p}@{b}"] = Timed(lambda s=sess, n=name, x=x: s.run(None, {n: x}))
    log(f"latency: {len(arms)} arms interleaved ({threads} thread(s), {iters} timed calls each)")
    stats = time_arms(arms, warmup=warmup, iters=iters, rounds=rounds)
    return {"stats": stats, "skipped": skipped}


def markdown(res: dict) -> str:
    env, acc, lat = res["environment"], res["accuracy"], res["latency"]
    batches = res["protocol"]["batches"]
    lines = [
        f"# ONNX precisions of `{res['run']}` ({res['variant']}) on the CPU", "",
        f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical cores); VNNI flags: {', '.join(res['cpu_flags']['vnni']) or 'none'}; "
        f"AMX flags: {', '.join(res['cpu_flags']['amx']) or 'none'}  ",
        f"ONNX Runtime {env['onnxruntime']} CPUExecutionProvider, {res['protocol']['threads']} intra-op thread(s), 1 inter-op; "
        f"nvidia-modelopt {res['modelopt']}  ",
        f"Accuracy on {res['eval_images']} eval images against the fp32 ONNX; int8 calibrated on {res['calibration_images']} train images.", "",
        "| precision | runtime (accuracy) | top-1 % | agreement with fp32 % | max logit diff | rel. to max logit | within tolerance | "
        + " | ".join(f"ms @ batch {b}" for b in batches) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(batches),
    ]
    fp32_ms = {b: lat["stats"].get(f"fp32@{b}", {}).get("median_ms") for b in batches}
    for p in res["precisions"]:
        a = acc.get(p, {})
        ms = [lat["stats"].get(f"{p}@{b}", {}).get("median_ms") for b in batches]
        cells = [f"{m:.3f}" + (f" ({m / fp32_ms[b]:.2f}x)" if p != "fp32" and fp32_ms[b] else "") if m is not None else "n/a" for m, b in zip(ms, batches)]
        if "error" in a:
            lines.append(f"| {p} | error: {a['error']} | | | | | no | " + " | ".join(cells) + " |")
        elif p == "fp32":
            lines.append(f"| fp32 | onnxruntime CPU | {res['top1_fp32']:.2f} | 100 | 0 | 0 | reference | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {p} | {a['runtime'].split(' (')[0]} | {a['top1']:.2f} | {100 * a['top1_agreement']:.2f} | {a['max_abs_diff']:.3g} | "
                         f"{a['max_rel_diff']:.3g} | {'yes' if a['within_tolerance'] else 'NO: ' + '; '.join(a['problems'])} | " + " | ".join(cells) + " |")
    lines += ["", "Latency: median of the timed calls, ms per call (ratio to fp32 at the same batch); random inputs of the model's shape; "
              f"{res['protocol']['warmup']} warm-up calls per arm, then at least {res['protocol']['iters']} timed calls per arm in "
              f"{res['protocol']['rounds']} rounds that rotate the arms (every precision and batch interleaved)."]
    for p, why in lat["skipped"].items():
        lines.append(f"No latency for {p}: ONNX Runtime CPU cannot open it ({why}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run directory (runs/<name>)")
    ap.add_argument("--variant", default="final")
    ap.add_argument("--precisions", default="fp16,bf16,int8", help="besides fp32 (fp8 too if asked)")
    ap.add_argument("--batches", default="1,8,64", help="latency batch sizes (images)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: every logical core)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20, help="timed calls per (precision, batch) arm, at least")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    import importlib.metadata
    import os
    from datetime import datetime, timezone

    from lotus_deploy.bench.facts import cpu_int8_flags
    from lotus_deploy.export.precision import missing_packages
    from lotus_deploy.files import write_json, write_text
    from lotus_deploy.run import Run, environment
    from lotus_deploy.stages.export import export_state
    from lotus_deploy.state import RunState

    if missing_packages():
        print(f"needs the `precision` extra ({', '.join(missing_packages())} missing): pip install -e '.[precision]'", file=sys.stderr)
        return 2
    precisions = ["fp32"] + [p for p in args.precisions.split(",") if p and p != "fp32"]
    batches = [int(b) for b in args.batches.split(",")]
    threads = args.threads or os.cpu_count() or 1
    state = RunState.from_run(Run(args.run), args.variant, quiet=True)
    eval_images = len(state.data.eval_dataset())
    state.recipe.export.precision_images = eval_images  # the whole eval split
    work = Path(args.run) / "precision" / args.variant
    log(f"export: fp32 ONNX of {args.run} ({args.variant}) into {work}")
    exported, arts = export_state(state, work, "fp32")
    acc = accuracy(state, arts["onnx"], precisions[1:])
    top1_fp32 = next((a["top1_fp32"] for a in acc.values() if "top1_fp32" in a), None)
    paths = {"fp32": arts["onnx"], **{p: work / f"model.{p}.onnx" for p in precisions[1:] if "error" not in acc[p]}}
    lat = latency(paths, tuple(exported_shape(arts["onnx"])), batches, threads, args.warmup, args.iters, args.rounds)
    res = {
        "run": Path(args.run).name, "variant": args.variant,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(), "cpu_flags": cpu_int8_flags(), "modelopt": importlib.metadata.version("nvidia-modelopt"),
        "precisions": precisions, "eval_images": eval_images, "top1_fp32": top1_fp32,
        "calibration_images": next((a["calibration_images"] for a in acc.values() if a.get("calibration_images")), 0),
        "export": {k: exported[k] for k in ("max_abs_diff", "top1_agreement", "images")},
        "protocol": {"threads": threads, "batches": batches, "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
                     "timer": "wall clock (time.perf_counter) per session.run call"},
        "accuracy": acc, "latency": lat,
    }
    stem = args.out / (f"precision_{res['run']}" + ("" if args.variant == "final" else f"_{args.variant}"))
    write_json(stem.with_suffix(".json"), res)
    write_text(stem.with_suffix(".md"), markdown(res))
    print(markdown(res))
    log(f"results: {stem}.json, {stem}.md")
    return 0


def exported_shape(path: Path) -> list[int]:
    """(C, H, W) of the ONNX's input (its batch axis dropped)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value for d in dims[1:]]


if __name__ == "__main__":
    sys.exit(main())
