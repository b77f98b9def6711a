"""Accuracy and latency of model variants on registered backends (CPU benchmark).

A backend is registered under a name; ``available()`` returns None or the reason it cannot run
here (the report lists skipped backends with that reason). ``prepare`` returns a callable
``f(x: torch.Tensor) -> torch.Tensor`` (logits on CPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .registry import Registry

REPORT_VERSION = 1


@dataclass
class Backend:
    name: str
    needs_onnx: bool
    available: Callable[[], str | None]
    prepare: Callable[..., Callable[[torch.Tensor], torch.Tensor]]
    description: str = ""


BACKENDS: Registry[Backend] = Registry("bench backend")


def register_backend(name: str, needs_onnx: bool = False, description: str = ""):
    def deco(cls_or_fns):
        BACKENDS.add(name, Backend(name, needs_onnx, cls_or_fns.available, cls_or_fns.prepare, description))
        return cls_or_fns

    return deco


@register_backend("torch_cpu", description="PyTorch eager, fp32, CPU")
class _TorchCPU:
    @staticmethod
    def available() -> str | None:
        return None

    @staticmethod
    def prepare(model, onnx_path=None, threads=None):
        model = model.eval().to("cpu")

        @torch.inference_mode()
        def run(x):
            return model(x)

        return run


@register_backend("onnxruntime_cpu", needs_onnx=True, description="ONNX Runtime, CPUExecutionProvider, fp32")
class _OrtCPU:
    @staticmethod
    def available() -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return f"onnxruntime is not installed ({e}); pip install onnxruntime"
        return None

    @staticmethod
    def prepare(model, onnx_path=None, threads=None):
        from .onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session

        sess = ort_session(onnx_path, threads=threads)

        def run(x):
            return torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

        return run


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float = 0.0) -> dict[str, float]:
    """Wall-clock latency of ``fn`` in ms: median, p90, mean over at least ``iters`` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - t_start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))],
        "mean_ms": statistics.fmean(times),
        "iters": len(times),
    }


def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], loader) -> dict[str, float]:
    """Top-1 (%) of a backend's own outputs over ``loader``, and its predictions."""
    correct = n = 0
    preds = []
    for x, y in loader:
        p = fn(x).argmax(1)
        preds.append(p)
        correct += (p == y).sum().item()
        n += len(y)
    return {"top1": 100.0 * correct / max(n, 1), "images": n, "preds": torch.cat(preds) if preds else torch.empty(0)}


def run_bench(run, cfg, out_dir: Path, log=print, data=None) -> dict:
    """Benchmark the variants of a run; writes ``report.json`` and ``report.md`` in ``out_dir``.

    Args:
        run: an opened :class:`lotus_deploy.pipeline.Run`.
        cfg: a :class:`lotus_deploy.config.BenchConfig`.
        data: a DataBundle to reuse (else built from the recipe).

    Returns:
        The report dict (also written as JSON).
    """
    from .data import build_data
    from .io import sha256_file, write_json, write_text
    from .masks import apply_masks_, weight_stats
    from .models import input_spec
    from .onnx_export import export_onnx
    from .pipeline import environment
    from .scope import DEFAULT_SCOPE, select_weights

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    threads = cfg.threads or torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = run.variants()
    rows, skipped = [], []
    backends = []
    for name in cfg.backends:
        b = BACKENDS[name]
        why = b.available()
        if why:
            skipped.append({"backend": name, "reason": why})
            log(f"bench: skipping {name}: {why}")
        else:
            backends.append(b)
    for variant in cfg.variants:
        model, masks = run.load(variant)
        apply_masks_(model, masks)
        if data is None:
            data = build_data(run.recipe.data, input_spec(model))
        loader = data.eval_loader(batch_size=64)
        onnx_path = out_dir / "onnx" / f"{variant}.onnx"
        example, _ = data.eval_batch(max(cfg.batch_sizes))
        if any(b.needs_onnx for b in backends):
            export_onnx(model, onnx_path, example[:1], opset=run.recipe.export.opset)
        scope = weight_stats(model, list(select_weights(model, DEFAULT_SCOPE)))
        whole = weight_stats(model)
        ckpt = run.dir / entries[variant]["artifacts"]["model"]["path"]
        facts = {
            "variant": variant,
            "checkpoint": str(ckpt.relative_to(run.dir)),
            "weights_sha256": entries[variant]["artifacts"]["model"]["sha256"],
            "params": whole["params"],
            "nonzeros": whole["nonzeros"],
            "scope_sparsity": scope["sparsity"],
            "checkpoint_bytes": ckpt.stat().st_size,
            "onnx_bytes": onnx_path.stat().st_size if onnx_path.exists() else None,
        }
        ref_preds = None
        for b in backends:
            fn = b.prepare(model, onnx_path=onnx_path, threads=threads)
            acc = accuracy(fn, loader) if cfg.accuracy else None
            if acc is not None:
                if ref_preds is None:
                    ref_preds = acc["preds"]
                agreement = (acc["preds"] == ref_preds).float().mean().item()
            for bs in cfg.batch_sizes:
                x = example[:bs]
                if len(x) < bs:
                    x = x.repeat((bs + len(x) - 1) // len(x), 1, 1, 1)[:bs]
                t = time_fn(lambda: fn(x), cfg.warmup, cfg.iters, cfg.min_seconds)
                row = {
                    **facts, "backend": b.name, "batch": bs,
                    "top1": acc["top1"] if acc else None, "eval_images": acc["images"] if acc else None,
                    "agreement_with_first_backend": agreement if acc else None,
                    **{f"latency_{k}": v for k, v in t.items() if k.endswith("_ms")}, "iters": t["iters"],
                    "images_per_s": bs / (t["median_ms"] / 1e3),
                }
                rows.append(row)
                log(
                    f"bench {variant:>12} {b.name:<16} b={bs:<3} top1 {row['top1'] if row['top1'] is not None else float('nan'):6.2f}% "
                    f"median {t['median_ms']:8.2f} ms p90 {t['p90_ms']:8.2f} ms {row['images_per_s']:8.1f} img/s"
                )
    report = {
        "version": REPORT_VERSION,
        "run": str(run.dir),
        "recipe": run.recipe.name,
        "protocol": {
            "eval_images": rows[0]["eval_images"] if rows else None,
            "eval_subset": run.recipe.data.eval_subset,
            "subset_seed": run.recipe.data.subset_seed,
            "batch_sizes": cfg.batch_sizes, "warmup": cfg.warmup, "iters": cfg.iters,
            "min_seconds": cfg.min_seconds, "threads": threads,
            "model": run.recipe.model.name, "img_size": input_spec(model).height if cfg.variants else None,
            "weights_file_sha256": sha256_file(run.recipe.model.weights) if run.recipe.model.weights and Path(run.recipe.model.weights).is_file() else None,
        },
        "environment": environment(),
        "skipped": skipped,
        "rows": rows,
    }
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    """The report as Markdown: protocol, then one table of variant x backend x batch."""
    env, p = report["environment"], report["protocol"]
    lines = [
        f"# lotus bench: {report['recipe']}",
        "",
        f"- model `{p['model']}` at {p['img_size']} px; eval images: {p['eval_images']} (subset {p['eval_subset']}, seed {p['subset_seed']})",
        f"- timing: {p['warmup']} warm-up, >= {p['iters']} iterations, min {p['min_seconds']} s; threads {p['threads']}",
        f"- machine: {env.get('cpu')} ({env.get('cpu_count')} cores); torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, timm {env.get('timm')}",
        "",
        "| variant | backend | batch | top-1 % | median ms | p90 ms | images/s | scope sparsity | nonzeros | params | checkpoint MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        top1 = f"{r['top1']:.2f}" if r["top1"] is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['backend']} | {r['batch']} | {top1} | {r['latency_median_ms']:.2f} | "
            f"{r['latency_p90_ms']:.2f} | {r['images_per_s']:.1f} | {r['scope_sparsity']:.3f} | {r['nonzeros']:,} | "
            f"{r['params']:,} | {r['checkpoint_bytes'] / 1e6:.2f} |"
        )
    for s in report["skipped"]:
        lines.append(f"\nSkipped backend `{s['backend']}`: {s['reason']}")
    return "\n".join(lines) + "\n"
