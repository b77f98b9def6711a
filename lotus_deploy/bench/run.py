"""``lotus bench``: accuracy and latency of every variant of a run on every backend.

Flow of :func:`run_bench`:

1. backends (``auto``, ``all`` or names, :mod:`lotus_deploy.bench.backends`): each one available
   here or skipped with its reason;
2. variants (``all`` or names): every model state the run produced, named by its stage,
   de-duplicated by checkpoint sha256 (``dense`` and ``final`` usually become aliases);
3. per variant: model facts (:mod:`lotus_deploy.bench.facts`), ONNX export when a backend needs
   it, each backend prepared as a :class:`lotus_deploy.runtime.Predictor` (a failing backend is
   recorded, never fatal), top-1 from each backend's *own* outputs and agreement with the
   PyTorch CPU fp32 reference (:func:`lotus_deploy.metrics.top1_loop`);
4. latency per batch size (:mod:`lotus_deploy.bench.timing`), every variant x backend arm timed
   side by side in rounds (``interleave: variants``; or one variant at a time, ``backends``), so
   that drift on a shared machine hits every arm alike and the variants of one table stay
   comparable;
5. pipeline efficiency: the eval loop's images/s over the forward's images/s on in-memory
   tensors; the same for essential-sparsity sweeps recorded in the manifest;
6. ``results.json`` (:class:`lotus_deploy.bench.results.BenchResults`, versioned;
   :func:`~lotus_deploy.bench.results.load_results` reads it back), ``results.csv``,
   ``report.md``, ``pareto.png``, ``sparsity.png`` (:func:`lotus_deploy.bench.report.write_outputs`).

Latency in ms; images/s = batch / median latency; sparsity = fraction of zero weights.
"""

from __future__ import annotations

import gc
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from lotus_deploy.bench.backends import (
    BACKENDS,
    Backend,
    BackendContext,
    resolve_backends,
)
from lotus_deploy.bench.facts import (
    bench_environment,
    model_facts,
    resolve_variants,
    sweep_efficiency,
)
from lotus_deploy.bench.pareto import mark_pareto
from lotus_deploy.bench.report import write_outputs
from lotus_deploy.bench.results import (
    TIMING_PROTOCOL,
    BackendStatus,
    BenchResults,
    Protocol,
)
from lotus_deploy.bench.timing import Timed, time_arms, time_fn
from lotus_deploy.errors import RunError
from lotus_deploy.metrics import agreement, top1_loop
from lotus_deploy.progress import bar
from lotus_deploy.runtime import Predictor

# ----------------------------------------------------------------------------- accuracy and pipeline


def accuracy_pass(predict: Callable[[Any], Any], loader) -> dict[str, Any]:
    """Top-1 (%) of ``predict``'s own logits over ``loader`` (:func:`lotus_deploy.metrics.top1_loop`);
    also the logits ``(N, classes)`` (numpy float32) and the loop's wall time (s)."""
    r = top1_loop({"p": predict}, bar(loader, desc="bench accuracy", unit="batch"), keep_logits=True)["p"]
    return {"top1": r["top1"], "images": r["images"], "logits": r["logits"], "seconds": r["seconds"]}


def pipeline_efficiency(model: torch.nn.Module, data, device: torch.device) -> dict[str, Any]:
    """The eval loop's images/s (:func:`lotus_deploy.train.evaluate` on the recipe's eval loader)
    over the forward's images/s on one in-memory batch of the same size, same precision.

    The eval cache (``cache_eval``) is built first: its one-off decoding is not the loop's steady
    state. Goal on the reference benchmark: >= 0.9.
    """
    from lotus_deploy.train import autocast, evaluate

    data.eval_dataset()  # decode once (cache_eval) before timing the loop
    loader = data.eval_loader()
    bs = loader.batch_size
    model = model.to(device).eval()
    ev = evaluate(model, loader, device, desc="pipeline")
    x = data.eval_batch(bs)[0].to(device)
    calls = math.ceil(ev["images"] / len(x))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast(device):
        model(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x).float()
        sync()
        seconds = time.perf_counter() - t0
    fwd = calls * len(x) / seconds
    return {
        "device": str(device), "batch_size": bs, "images": ev["images"], "cache_eval": data.cfg.cache_eval,
        "loop_images_per_s": ev["images_per_s"], "forward_images_per_s": fwd, "efficiency": ev["images_per_s"] / fwd,
    }


# ----------------------------------------------------------------------------- the benchmark


def _batch(example: torch.Tensor, bs: int) -> torch.Tensor:
    """``bs`` images from ``example`` (repeated when the eval set is smaller)."""
    reps = math.ceil(bs / len(example))
    return example.repeat(reps, 1, 1, 1)[:bs].contiguous() if reps > 1 else example[:bs].contiguous()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


class _Calibration:
    """The int8/fp8 calibration images of a run (``export.calibration_images`` train images), made once per bench."""

    def __init__(self, run, data):
        self.run, self.data, self.images = run, data, None

    def __call__(self):
        if self.images is None:
            from lotus_deploy.export.precision import calibration_images

            cfg = self.run.recipe
            self.images = calibration_images(self.data, cfg.export.calibration_images, cfg.data.subset_seed).numpy()
        return self.images


def _converter(onnx_path: Path, calibration: _Calibration, log: Callable[[str], Any]) -> Callable[[str], tuple[Path, dict]]:
    """precision -> ``(path, facts)`` of ``onnx_path`` converted and checked (:func:`lotus_deploy.export.precision.convert_verified`),
    each made once: ``<variant>.<precision>.onnx`` next to it."""
    made: dict[str, tuple[Path, dict]] = {}

    def convert(precision: str) -> tuple[Path, dict]:
        if precision not in made:
            from lotus_deploy.export.graph_precision import QUANTIZED
            from lotus_deploy.export.precision import convert_verified

            dst = onnx_path.with_name(f"{onnx_path.stem}.{precision}.onnx")
            facts = convert_verified(onnx_path, dst, precision, calibration() if precision in QUANTIZED else None)
            facts["calibration_images"] = len(calibration()) if precision in QUANTIZED else 0
            made[precision] = (dst, facts)
            log(f"bench: {dst.name}: {precision} ONNX ({facts['bytes'] / 1e6:.1f} MB, {facts['two_four']['kept']} 2:4 weight(s) kept)")
        return made[precision]

    return convert


def run_bench(run, cfg, out_dir: Path, log: Callable[[str], Any] = print, data=None) -> dict:
    """Benchmark the variants of a run; writes results.json/.csv, report.md and plots in ``out_dir``.

    Args:
        run: an opened :class:`lotus_deploy.run.Run`.
        cfg: a :class:`lotus_deploy.recipe.base.BenchConfig`.
        data: a DataBundle to reuse (else built from the recipe).

    Returns:
        The results as a JSON-able dict (:class:`BenchResults`).

    Raises:
        RunError: unknown variant or backend name.
    """
    from lotus_deploy.data import build_data
    from lotus_deploy.export.onnx_export import export_onnx
    from lotus_deploy.files import sha256_file
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.models import input_spec
    from lotus_deploy.run import resolve_device

    try:
        backends: list[Backend] = resolve_backends(cfg.backends)
    except KeyError as e:
        raise RunError(f"bench.backends: {e.args[0]}; or auto (the default ones available here), all") from None
    variants = resolve_variants(run, cfg.variants)
    old_threads = torch.get_num_threads()
    threads = cfg.threads or old_threads
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        statuses: dict[str, BackendStatus] = {}
        ready: list[Backend] = []
        for b in backends:
            why = b.available()
            statuses[b.name] = BackendStatus(name=b.name, description=b.description, device=b.device, precision=b.precision, family=b.family,
                                             status="skipped" if why else "failed", reason=why)
            if why:
                log(f"bench: skipping {b.name}: {why}")
            else:
                ready.append(b)
        facts_out, acc_out, rows, failures = [], [], [], []
        spec = None
        calibration = None
        acc_bs = max(cfg.batch_sizes)
        pending: list[dict] = []  # prepared variants waiting to be timed

        def fail(variant: str, backend: str, e: BaseException, when: str = "") -> None:
            failures.append({"variant": variant, "backend": backend, "error": f"{when}{_err(e)}"})
            log(f"bench: {backend} failed on {variant}{' ' + when.rstrip(': ') if when else ''}: {_err(e)}")

        def time_pending() -> None:
            """Latency of every pending variant x backend arm, side by side, per batch size."""
            if not pending:
                return
            for bs in cfg.batch_sizes:
                x = _batch(example, bs)
                arms, copies = {}, {}
                for pv in pending:
                    for bname, p in list(pv["prepared"].items()):
                        try:
                            staged = p.stage(x)
                            y = p.forward(staged)
                            # an asynchronous forward (a sync to wait for it) is timed with CUDA events
                            arms[(pv["name"], bname)] = Timed((lambda p=p, s=staged: p.forward(s)), p.sync, p.sync is not None)
                            if BACKENDS[bname].device != "cpu":
                                copies[(pv["name"], bname)] = {
                                    "h2d": time_fn(lambda p=p: p.stage(x), 2, cfg.iters, sync=p.sync)["median_ms"],
                                    "d2h": time_fn(lambda p=p, y=y: p.fetch(y), 2, cfg.iters, sync=p.sync)["median_ms"],
                                }
                        except Exception as e:  # noqa: BLE001
                            fail(pv["name"], bname, e, f"batch {bs}: ")
                timings = time_arms(arms, cfg.warmup, cfg.iters, cfg.min_seconds, cfg.rounds) if arms else {}
                facts = {pv["name"]: pv["facts"] for pv in pending}
                accs = {pv["name"]: pv["acc"] for pv in pending}
                for (vname, bname), t in timings.items():
                    a = accs[vname].get(bname)
                    cp = copies.get((vname, bname), {})
                    row = {
                        "variant": vname, "backend": bname, "batch": bs,
                        "top1": a["top1"] if a else None, "agreement": a["agreement"] if a else None,
                        **{f"latency_{k}": t[k] for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "std_ms")},
                        "iters": t["iters"], "timer": t["timer"], "images_per_s": bs / (t["median_ms"] / 1e3),
                        "h2d_median_ms": cp.get("h2d"), "d2h_median_ms": cp.get("d2h"),
                        **{k: facts[vname][k] for k in ("scope_sparsity", "nonzeros", "params", "two_four_layers")},
                    }
                    rows.append(row)
                    statuses[bname].status = "measured"
                    top1 = f"{row['top1']:6.2f}%" if row["top1"] is not None else "     -"
                    log(
                        f"bench {vname:>14} {bname:<20} b={bs:<3} top1 {top1} median {t['median_ms']:8.2f} ms "
                        f"p90 {t['p90_ms']:8.2f} ms {row['images_per_s']:8.1f} img/s"
                    )
            pending.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

        progress = bar(total=len(variants), desc="bench variants", unit="variant")
        for v in variants:
            name = v["name"]
            progress.set_postfix_str(name)
            progress.update(1)
            model, masks = run.load(name)
            apply_masks_(model, masks)
            spec = input_spec(model)
            if data is None:
                data = build_data(run.recipe.data, spec)
            calibration = calibration or _Calibration(run, data)
            example, _ = data.eval_batch(max(cfg.batch_sizes))
            onnx_path = out_dir / "onnx" / f"{name}.onnx"
            if any(b.needs_onnx for b in ready):
                export_onnx(model, onnx_path, example[:1], opset=run.recipe.export.opset)
            ckpt = run.dir / v["entry"]["artifacts"]["model"]["path"]
            facts = {
                "variant": name, "aliases": v["aliases"], "checkpoint": str(ckpt.relative_to(run.dir)),
                "weights_sha256": v["entry"]["artifacts"]["model"]["sha256"], **model_facts(model),
                "checkpoint_bytes": ckpt.stat().st_size, "onnx_bytes": onnx_path.stat().st_size if onnx_path.exists() else None,
            }
            ctx = BackendContext(
                onnx_path if onnx_path.exists() else None, out_dir / "work" / name, threads, list(cfg.batch_sizes),
                tuple(example.shape[1:]), two_four_layers=facts["two_four_layer_names"], log=log,
                convert=_converter(onnx_path, calibration, log) if onnx_path.exists() else None,
            )
            prepared: dict[str, Predictor] = {}
            for b in ready:
                try:
                    prepared[b.name] = b.prepare(model, ctx)
                    statuses[b.name].info = prepared[b.name].details
                except Exception as e:  # noqa: BLE001 — one backend failing must not end the bench
                    fail(name, b.name, e, "prepare: ")
            acc: dict[str, dict] = {}
            if cfg.accuracy:
                loader = data.eval_loader(batch_size=acc_bs)
                ref_pred = prepared.get("torch_cpu") or BACKENDS["torch_cpu"].prepare(model, ctx)
                ref = accuracy_pass(ref_pred.predict, loader)
                facts["reference_top1"] = ref["top1"]
                for bname, p in list(prepared.items()):
                    try:
                        a = ref if bname == "torch_cpu" else accuracy_pass(p.predict, loader)
                    except Exception as e:  # noqa: BLE001
                        fail(name, bname, e, "accuracy: ")
                        del prepared[bname]
                        continue
                    same = agreement(a["logits"], ref["logits"])
                    acc[bname] = {
                        "variant": name, "backend": bname, "top1": a["top1"], "images": a["images"],
                        "agreement": same["top1_agreement"], "max_abs_logit_diff": same["max_abs_diff"], "seconds": a["seconds"],
                    }
                    acc_out.append(acc[bname])
            facts_out.append(facts)
            pending.append({"name": name, "facts": facts, "prepared": prepared, "acc": acc})
            del model, prepared
            if cfg.interleave == "backends":
                time_pending()
        progress.close()
        time_pending()
        pipeline = None
        if cfg.pipeline and variants:
            first = variants[0]["name"]
            model, masks = run.load(first)
            apply_masks_(model, masks)
            pipeline = {"variant": first, **pipeline_efficiency(model, data, resolve_device(run.recipe.device))}
            pipeline["sweeps"] = sweep_efficiency(run.manifest, pipeline["images"], pipeline["forward_images_per_s"])
            log(
                f"bench pipeline: eval loop {pipeline['loop_images_per_s']:.1f} img/s, forward {pipeline['forward_images_per_s']:.1f} img/s "
                f"-> efficiency {pipeline['efficiency']:.2f}"
            )
        for f in failures:
            st = statuses[f["backend"]]
            if st.status != "measured":
                st.reason = st.reason or f["error"]
        mark_pareto(rows)
        weights = run.recipe.model.weights
        results = BenchResults(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            run=str(run.dir), recipe=run.recipe.name,
            protocol=Protocol(
                model=run.recipe.model.name, img_size=spec.height if spec else run.recipe.model.img_size or 0,
                eval_images=acc_out[0]["images"] if acc_out else None, eval_subset=run.recipe.data.eval_subset,
                subset_seed=run.recipe.data.subset_seed, accuracy_batch=acc_bs, batch_sizes=list(cfg.batch_sizes),
                warmup=cfg.warmup, iters=cfg.iters, min_seconds=cfg.min_seconds, rounds=cfg.rounds, interleave=cfg.interleave, threads=threads,
                weights_file_sha256=sha256_file(weights) if weights and Path(weights).is_file() else None, timing=TIMING_PROTOCOL,
            ),
            environment=bench_environment(threads),
            backends=list(statuses.values()), variants=facts_out, accuracy=acc_out, rows=rows, failures=failures,
            pipeline=pipeline,
        )
        written = write_outputs(results, out_dir)
        log(f"bench: wrote {', '.join(str(p) for p in written.values())}")
        return results.model_dump(mode="json")
    finally:
        torch.set_num_threads(old_threads)
