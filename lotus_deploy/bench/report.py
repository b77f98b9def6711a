"""Bench results as files: CSV, Markdown, the output folder, and side-by-side comparisons.

Everything here reads a :class:`lotus_deploy.bench.results.BenchResults` (or its rows) and
writes text (the figures: :mod:`lotus_deploy.bench.plots`); nothing measures. Latency in ms,
accuracy in percent top-1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from lotus_deploy.bench.results import BenchResults
from lotus_deploy.files import csv_text, write_json, write_text

CSV_COLUMNS = (
    "variant", "backend", "batch", "top1", "agreement", "latency_median_ms", "latency_p90_ms", "latency_p99_ms",
    "latency_mean_ms", "latency_min_ms", "latency_std_ms", "iters", "timer", "images_per_s", "h2d_median_ms",
    "d2h_median_ms", "scope_sparsity", "nonzeros", "params", "two_four_layers", "pareto",
)
PARETO_MARK = "★"


# ----------------------------------------------------------------------------- CSV and Markdown


def results_csv(rows: Iterable[dict]) -> str:
    """One line per variant x backend x batch (:data:`CSV_COLUMNS`)."""
    return csv_text(rows, CSV_COLUMNS)


def _f(v: Any, fmt: str = ".2f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def environment_lines(env: dict) -> list[str]:
    gpu = env.get("gpu")
    gpu_line = (
        f"- GPU: {gpu} (cc {'.'.join(map(str, env.get('gpu_capability') or []))}), driver {env.get('gpu_driver')}, "
        f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, TensorRT {env.get('tensorrt')}"
        if gpu else "- GPU: none (CUDA not available to torch)"
    )
    return [
        f"- CPU: {env.get('cpu')} ({env.get('cpu_count')} logical cores); {env.get('platform')}",
        *([cpu_int8_line(env["cpu_int8"])] if env.get("cpu_int8") is not None else []),
        gpu_line,
        f"- threads: bench {env.get('bench_threads')} (torch intra-op and ONNX Runtime intra-op), torch inter-op "
        f"{env.get('torch_interop_threads')}, OMP_NUM_THREADS {env.get('omp_num_threads')}",
        f"- versions: python {env.get('python')}, torch {env.get('torch')}, timm {env.get('timm')}, onnx {env.get('onnx')}, "
        f"onnxruntime {env.get('onnxruntime')} ({', '.join(env.get('onnxruntime_providers') or [])}), numpy {env.get('numpy')}",
    ]


def cpu_int8_line(flags: dict) -> str:
    """Whether the CPU has the instructions ONNX Runtime's int8 kernels use (VNNI, AMX)."""
    vnni, amx = flags.get("vnni") or [], flags.get("amx") or []
    have = " and ".join(w for w, f in (("VNNI", vnni), ("AMX", amx)) if f)
    return (f"- CPU int8 instructions: VNNI {', '.join(vnni) or 'none'}; AMX {', '.join(amx) or 'none'} "
            + (f"(ONNX Runtime's int8 kernels use {have})" if have else "(neither: int8 runs without dot-product instructions and gains little on this CPU)"))


def precision_lines(res: BenchResults) -> list[str]:
    """The ``## Precisions`` section: per runtime family with more than one precision measured, each
    precision's top-1 and median latency per batch, with the ratio to the family's fp32 row; the
    precision backends not measured (GPU ones here) with their reason."""
    status = {b.name: b for b in res.backends}
    fams: dict[str, set[str]] = defaultdict(set)
    for r in res.rows:
        b = status.get(r.backend)
        if b is not None:
            fams[b.family or b.name].add(r.backend)
    fams = {f: names for f, names in fams.items() if len({status[n].precision for n in names}) > 1}
    unmeasured = [b for b in res.backends if b.status != "measured" and b.precision != "fp32" and b.family in ("onnxruntime_cpu", "tensorrt")]
    if not fams and not unmeasured:
        return []
    batches = sorted({r.batch for r in res.rows})
    acc = {(a.variant, a.backend): a for a in res.accuracy}
    lines = ["", "## Precisions", "",
             "The same variant run in each precision by one runtime: the ONNX converted by the export's precision step "
             "(fp32 inputs/outputs, 2:4 kept), top-1 from its own outputs, agreement with the PyTorch CPU fp32 reference; "
             "median latency, in brackets its ratio to the same runtime in fp32 at the same batch."]
    for fam, names in fams.items():
        rows = [r for r in res.rows if r.backend in names]
        lines += ["", f"### {fam}", "",
                  "| variant | precision | backend | top-1 % | agreement % | " + " | ".join(f"ms @ batch {b}" for b in batches) + " |",
                  "|---|---|---|---:|---:|" + "---:|" * len(batches)]
        ms = {(r.variant, r.backend, r.batch): r.latency_median_ms for r in rows}
        base = {v: next((n for n in names if status[n].precision == "fp32"), None) for v in {r.variant for r in rows}}
        order = ["fp32", "fp16", "bf16", "int8", "fp8"]
        for v, n in sorted({(r.variant, r.backend) for r in rows}, key=lambda k: (k[0], order.index(status[k[1]].precision) if status[k[1]].precision in order else 9)):
            cells = []
            for b in batches:
                m, ref = ms.get((v, n, b)), ms.get((v, base[v], b)) if base[v] else None
                cells.append("-" if m is None else f"{m:.2f}" + (f" ({m / ref:.2f}x)" if ref and n != base[v] else ""))
            a = acc.get((v, n))
            lines.append(f"| {v} | {status[n].precision} | {n} | {_f(a and a.top1)} | {_f(a and 100 * a.agreement)} | " + " | ".join(cells) + " |")
    if unmeasured:
        lines += ["", *(f"- `{b.name}` ({b.precision}) not measured: {b.reason}" for b in unmeasured)]
    return lines


def report_markdown(res: BenchResults) -> str:
    """The report: protocol, environment, variants, accuracy per backend, then one latency table per
    backend and batch size with the Pareto-optimal rows marked, pipeline efficiency, skipped backends."""
    p = res.protocol
    lines = [
        f"# lotus bench: {res.recipe}",
        "",
        f"Run `{res.run}`, measured {res.created}. Results schema {res.format} v{res.version} (`results.json`).",
        "",
        "## Protocol",
        "",
        f"- model `{p.model}` at {p.img_size} px; eval images: {p.eval_images} (subset {p.eval_subset}, seed {p.subset_seed}); "
        f"weights file sha256 {p.weights_file_sha256 or '-'}",
        f"- timing: {p.warmup} warm-up, >= {p.iters} timed calls and >= {p.min_seconds} s, in {p.rounds} rounds interleaving the {'variant x backend arms' if p.interleave == 'variants' else 'backends of each variant'}; "
        f"threads {p.threads}; accuracy at batch {p.accuracy_batch}",
        f"- {p.timing}",
        "",
        "## Environment",
        "",
        *environment_lines(res.environment),
        "",
        "## Variants",
        "",
        "| variant | also | params | non-zeros | scope sparsity | 2:4 layers | checkpoint MB | ONNX MB | reference top-1 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in res.variants:
        lines.append(
            f"| {v.variant} | {', '.join(v.aliases) or '-'} | {v.params:,} | {v.nonzeros:,} | {v.scope_sparsity:.3f} | "
            f"{v.two_four_layers}/{v.linear_layers} | {v.checkpoint_bytes / 1e6:.2f} | {_f(v.onnx_bytes and v.onnx_bytes / 1e6)} | "
            f"{_f(v.reference_top1)} |"
        )
    if res.accuracy:
        lines += [
            "", "## Accuracy on each backend", "",
            "Top-1 from each backend's own outputs; agreement = share of eval images whose top-1 class equals the "
            "PyTorch CPU fp32 reference's.", "",
            "| variant | backend | top-1 % | agreement % | max abs logit diff | images |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for a in res.accuracy:
            lines.append(f"| {a.variant} | {a.backend} | {a.top1:.2f} | {100 * a.agreement:.2f} | {a.max_abs_logit_diff:.2e} | {a.images} |")
    lines += ["", "## Latency", "", f"{PARETO_MARK} = Pareto-optimal in its table (no variant is both faster and more accurate)."]
    by_table: dict[tuple[str, int], list] = defaultdict(list)
    for r in res.rows:
        by_table[(r.backend, r.batch)].append(r)
    for (backend, batch), rows in by_table.items():
        copies = any(r.h2d_median_ms is not None for r in rows)
        lines += [
            "", f"### {backend}, batch {batch}", "",
            "| | variant | top-1 % | median ms | p90 ms | p99 ms | images/s | scope sparsity | non-zeros |" + (" H2D ms | D2H ms |" if copies else ""),
            "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if copies else ""),
        ]
        for r in sorted(rows, key=lambda r: r.latency_median_ms):
            lines.append(
                f"| {PARETO_MARK if r.pareto else ''} | {r.variant} | {_f(r.top1)} | {r.latency_median_ms:.2f} | {r.latency_p90_ms:.2f} | "
                f"{r.latency_p99_ms:.2f} | {r.images_per_s:.1f} | {r.scope_sparsity:.3f} | {r.nonzeros:,} |"
                + (f" {_f(r.h2d_median_ms, '.3f')} | {_f(r.d2h_median_ms, '.3f')} |" if copies else "")
            )
    lines += precision_lines(res)
    if res.pipeline:
        pl = res.pipeline
        lines += [
            "", "## Pipeline efficiency", "",
            f"Eval loop {pl.loop_images_per_s:.1f} images/s over the forward alone on in-memory tensors "
            f"{pl.forward_images_per_s:.1f} images/s = **{pl.efficiency:.2f}** (goal >= 0.9; {pl.images} images, batch "
            f"{pl.batch_size}, {pl.device}, cache_eval {pl.cache_eval}, variant {pl.variant}).",
        ]
        for s in pl.sweeps:
            ratio = f"**{s.ratio:.2f}** x (points x one forward pass) (goal <= 1.1)" if s.ratio is not None else "ratio unknown"
            own = f"; against its own evaluation loops {s.stage_cost_ratio:.2f} x" if s.stage_cost_ratio is not None else ""
            lines.append(f"- sweep `{s.stage}`: {s.wall_s:.1f} s for {s.points or '?'} evaluations: {ratio}{own}; {s.note}.")
    skipped = [b for b in res.backends if b.status != "measured"]
    if skipped:
        lines += ["", "## Backends not measured", ""]
        lines += [f"- `{b.name}` ({b.status}): {b.reason}" for b in skipped]
    if res.failures:
        lines += ["", "## Failures", ""]
        lines += [f"- `{f.backend}` on `{f.variant}`: {f.error}" for f in res.failures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the output folder


def write_outputs(res: BenchResults, out_dir: Path) -> dict[str, Path]:
    """results.json, results.csv, report.md, pareto.png and sparsity.png in ``out_dir``."""
    from lotus_deploy.bench.plots import plot_pareto, plot_sparsity

    rows = [r.model_dump() for r in res.rows]
    return {
        "results_json": write_json(out_dir / "results.json", res.model_dump(mode="json")),
        "results_csv": write_text(out_dir / "results.csv", results_csv(rows)),
        "report_md": write_text(out_dir / "report.md", report_markdown(res)),
        "pareto_png": plot_pareto(res, out_dir / "pareto.png"),
        "sparsity_png": plot_sparsity(res, out_dir / "sparsity.png"),
    }


# ----------------------------------------------------------------------------- comparison


def compare(a: BenchResults, b: BenchResults) -> dict[str, Any]:
    """Rows of ``a`` and ``b`` matched on (variant, backend, batch): latency and throughput ratios
    ``b / a`` and the top-1 difference ``b - a`` (points). Unmatched rows are listed.

    Returns:
        ``rows`` (matched), ``only_a``, ``only_b``, and ``summary`` over the matched rows:
        geometric mean, min and max of the median-latency ratio, and the share within 10%.
    """
    key = lambda r: (r.variant, r.backend, r.batch)  # noqa: E731
    ia, ib = {key(r): r for r in a.rows}, {key(r): r for r in b.rows}
    rows = []
    for k in ia:
        if k in ib:
            ra, rb = ia[k], ib[k]
            rows.append({
                "variant": k[0], "backend": k[1], "batch": k[2],
                "a_median_ms": ra.latency_median_ms, "b_median_ms": rb.latency_median_ms,
                "median_ratio": rb.latency_median_ms / ra.latency_median_ms,
                "p90_ratio": rb.latency_p90_ms / ra.latency_p90_ms,
                "images_per_s_ratio": rb.images_per_s / ra.images_per_s,
                "a_top1": ra.top1, "b_top1": rb.top1,
                "top1_diff": None if ra.top1 is None or rb.top1 is None else rb.top1 - ra.top1,
            })
    ratios = [r["median_ratio"] for r in rows]
    summary = {
        "matched": len(rows),
        "median_ratio_geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
        "median_ratio_min": min(ratios) if ratios else None,
        "median_ratio_max": max(ratios) if ratios else None,
        "within_10pct": sum(abs(x - 1) <= 0.10 for x in ratios),
    }
    return {
        "a": a.run, "b": b.run, "rows": rows, "summary": summary,
        "only_a": [list(k) for k in ia if k not in ib], "only_b": [list(k) for k in ib if k not in ia],
    }


def compare_markdown(c: dict, a_label: str = "A", b_label: str = "B") -> str:
    """A comparison as Markdown: one row per matched variant x backend x batch."""
    s = c["summary"]
    lines = [
        f"# lotus bench: {b_label} vs {a_label}",
        "",
        f"- {a_label}: `{c['a']}`",
        f"- {b_label}: `{c['b']}`",
        "",
        "| variant | backend | batch | A median ms | B median ms | B/A median | B/A p90 | B/A images/s | A top-1 % | B top-1 % | B-A top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in c["rows"]:
        lines.append(
            f"| {r['variant']} | {r['backend']} | {r['batch']} | {r['a_median_ms']:.2f} | {r['b_median_ms']:.2f} | "
            f"{r['median_ratio']:.3f} | {r['p90_ratio']:.3f} | {r['images_per_s_ratio']:.3f} | {_f(r['a_top1'])} | "
            f"{_f(r['b_top1'])} | {_f(r['top1_diff'], '+.2f')} |"
        )
    if s["matched"]:
        lines += [
            "",
            f"Median-latency ratio B/A over {s['matched']} matched rows: geometric mean {s['median_ratio_geomean']:.3f}, "
            f"range {s['median_ratio_min']:.3f} .. {s['median_ratio_max']:.3f}; {s['within_10pct']} of {s['matched']} within 10%.",
        ]
    else:
        lines += ["", "No rows match on (variant, backend, batch)."]
    for side, label in (("only_a", a_label), ("only_b", b_label)):
        if c[side]:
            lines.append(f"\nOnly in {label}: " + ", ".join(f"{v}/{be}/b{bs}" for v, be, bs in c[side]))
    return "\n".join(lines) + "\n"
