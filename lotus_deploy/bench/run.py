"""``lotus bench``: accuracy and latency of every variant of a run on every backend.

Flow of :func:`run_bench`:

1. backends (``auto``, ``all`` or names, :mod:`lotus_deploy.backends`): each one available here
   or skipped with its reason;
2. variants (``all`` or names): every model state the run produced, named by its stage,
   de-duplicated by checkpoint sha256 (``dense`` and ``final`` usually become aliases);
3. per variant: model facts, ONNX export when a backend needs it, each backend prepared (a
   failing backend is recorded, never fatal), top-1 from each backend's *own* outputs and
   agreement with the PyTorch CPU fp32 reference;
4. latency per batch size, every variant x backend arm timed side by side in rounds
   (``interleave: variants``; or one variant at a time, ``backends``), so that drift on a shared
   machine hits every arm alike and the variants of one table stay comparable;
5. pipeline efficiency: the eval loop's images/s over the forward's images/s on in-memory
   tensors; the same for essential-sparsity sweeps recorded in the manifest;
6. ``results.json`` (:class:`BenchResults`, versioned; :func:`load_results` reads it back),
   ``results.csv``, ``report.md``, ``pareto.png``, ``sparsity.png`` (:mod:`lotus_deploy.report`).

Latency in ms; images/s = batch / median latency; sparsity = fraction of zero weights.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from lotus_deploy.bench.backends import (
    BACKENDS,
    Backend,
    BackendContext,
    Prepared,
    register_backend,
    resolve_backends,
)
from lotus_deploy.errors import RunError

RESULTS_FORMAT = "lotus.bench"
RESULTS_VERSION = 2
TIMING_PROTOCOL = (
    "per backend and batch: warm-up calls, then at least `iters` timed calls and `min_seconds`, split into "
    "`rounds` rounds that interleave the arms (every variant x backend, or the backends of one variant: "
    "`interleave`); CPU: wall clock (time.perf_counter); CUDA: events on the "
    "current stream, synchronized; host-to-device and device-to-host copies timed separately, not in the latency"
)


class ResultsError(RunError):
    """A results file that cannot be read (missing, another format, another version)."""


# ----------------------------------------------------------------------------- results schema


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendStatus(_Schema):
    """One requested backend: measured, skipped (unavailable here) or failed (raised while running)."""

    name: str
    description: str
    device: str
    status: Literal["measured", "skipped", "failed"]
    reason: str | None = None
    info: dict[str, Any] = {}


class VariantFacts(_Schema):
    """A model state of the run and what it is made of."""

    variant: str
    aliases: list[str]
    checkpoint: str
    weights_sha256: str
    params: int
    nonzeros: int
    sparsity: float
    scope: list[str]
    scope_params: int
    scope_nonzeros: int
    scope_sparsity: float
    linear_layers: int
    two_four_layers: int
    two_four_layer_names: list[str]
    checkpoint_bytes: int
    onnx_bytes: int | None = None
    reference_top1: float | None = None


class Accuracy(_Schema):
    """Top-1 of one variant on one backend, from that backend's own outputs."""

    variant: str
    backend: str
    top1: float
    images: int
    agreement: float
    max_abs_logit_diff: float
    seconds: float


class Row(_Schema):
    """One variant x backend x batch size: latency and the facts to plot it against."""

    variant: str
    backend: str
    batch: int
    top1: float | None
    agreement: float | None
    latency_median_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_min_ms: float
    latency_std_ms: float
    iters: int
    timer: Literal["wall", "cuda_events"]
    images_per_s: float
    h2d_median_ms: float | None = None
    d2h_median_ms: float | None = None
    scope_sparsity: float
    nonzeros: int
    params: int
    two_four_layers: int
    pareto: bool = False


class Failure(_Schema):
    variant: str
    backend: str
    error: str


class SweepEfficiency(_Schema):
    """Wall time of an essential-sparsity sweep against points x one forward pass over the eval set
    (``stage_cost_ratio``: the stage's own ratio to its evaluation loops, when it recorded one)."""

    stage: str
    wall_s: float
    points: int | None
    ideal_s: float | None
    ratio: float | None
    stage_cost_ratio: float | None = None
    note: str


class Pipeline(_Schema):
    """Eval loop throughput over the model's forward throughput on tensors already in memory."""

    variant: str
    device: str
    batch_size: int
    images: int
    cache_eval: bool
    loop_images_per_s: float
    forward_images_per_s: float
    efficiency: float
    sweeps: list[SweepEfficiency] = []


class Protocol(_Schema):
    model: str
    img_size: int
    eval_images: int | None
    eval_subset: int | None
    subset_seed: int
    accuracy_batch: int
    batch_sizes: list[int]
    warmup: int
    iters: int
    min_seconds: float
    rounds: int
    interleave: str
    threads: int
    weights_file_sha256: str | None
    timing: str


class BenchResults(_Schema):
    """Everything one bench measured (``results.json``); ``version`` changes with the schema."""

    format: Literal["lotus.bench"] = RESULTS_FORMAT
    version: Literal[2] = RESULTS_VERSION
    created: str
    run: str
    recipe: str
    protocol: Protocol
    environment: dict[str, Any]
    backends: list[BackendStatus]
    variants: list[VariantFacts]
    accuracy: list[Accuracy]
    rows: list[Row]
    failures: list[Failure] = []
    pipeline: Pipeline | None = None


def results_path(path: str | Path) -> Path:
    """A results file, bench folder (``results.json`` in it) or run folder (``bench/results.json``)."""
    p = Path(path)
    for cand in (p, p / "results.json", p / "bench" / "results.json"):
        if cand.is_file():
            return cand
    raise ResultsError(f"no bench results at {p} (looked for {p}, {p / 'results.json'}, {p / 'bench' / 'results.json'}); run `lotus bench RUN` first")


def load_results(path: str | Path) -> BenchResults:
    """Read and validate ``results.json`` (or the one in a bench or run folder).

    Raises:
        ResultsError: missing file, not lotus bench results, or another schema version.
    """
    import json

    p = results_path(path)
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{p} is not JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != RESULTS_FORMAT:
        raise ResultsError(f"{p} is not a lotus bench results file (written by an older lotus? re-run `lotus bench`)")
    if raw.get("version") != RESULTS_VERSION:
        raise ResultsError(f"{p} has results version {raw.get('version')}; this lotus reads version {RESULTS_VERSION}: re-run `lotus bench`")
    try:
        return BenchResults.model_validate(raw)
    except ValidationError as e:
        raise ResultsError(f"{p} does not match the results schema v{RESULTS_VERSION}: {e}") from None


# ----------------------------------------------------------------------------- timing


@dataclass
class Timed:
    """One arm of a timing: ``fn()`` is the timed call; ``sync`` waits for device work."""

    fn: Callable[[], Any]
    sync: Callable[[], None] | None = None
    cuda_events: bool = False


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, linear interpolation (numpy's default)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(times_ms: list[float], timer: str = "wall") -> dict[str, Any]:
    """median, p90, p99, mean, min, max, std (ms) and the number of timed calls."""
    t = sorted(times_ms)
    return {
        "median_ms": statistics.median(t), "p90_ms": percentile(t, 0.9), "p99_ms": percentile(t, 0.99),
        "mean_ms": statistics.fmean(t), "min_ms": t[0], "max_ms": t[-1],
        "std_ms": statistics.stdev(t) if len(t) > 1 else 0.0, "iters": len(t), "timer": timer,
    }


def _time_once(arm: Timed) -> float:
    if arm.cuda_events:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        arm.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    if arm.sync:
        arm.sync()
    t0 = time.perf_counter()
    arm.fn()
    if arm.sync:
        arm.sync()
    return (time.perf_counter() - t0) * 1e3


def time_arms(arms: dict[str, Timed], warmup: int, iters: int, min_seconds: float = 0.0, rounds: int = 5) -> dict[str, dict]:
    """Latency of several arms measured side by side.

    Every arm gets ``warmup`` untimed calls, then timed calls in rounds: each round runs
    ``ceil(iters / rounds)`` calls of every arm, the arm order rotating between rounds, until every
    arm has at least ``iters`` calls and ``min_seconds`` of timed calls.

    Returns:
        arm name -> :func:`latency_stats` (ms).
    """
    names = list(arms)
    for n in names:
        for _ in range(warmup):
            arms[n].fn()
        if arms[n].sync:
            arms[n].sync()
    per_round = max(1, math.ceil(iters / max(rounds, 1)))
    times: dict[str, list[float]] = {n: [] for n in names}
    r = 0
    while any(len(times[n]) < iters or sum(times[n]) < min_seconds * 1e3 for n in names):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            for _ in range(per_round):
                times[n].append(_time_once(arms[n]))
        r += 1
    return {n: latency_stats(times[n], "cuda_events" if arms[n].cuda_events else "wall") for n in names}


def time_fn(fn: Callable[[], Any], warmup: int, iters: int, min_seconds: float = 0.0, sync=None, cuda_events: bool = False) -> dict:
    """Latency of one callable (:func:`time_arms` with one arm, one round)."""
    return time_arms({"fn": Timed(fn, sync, cuda_events)}, warmup, iters, min_seconds, rounds=1)["fn"]


# ----------------------------------------------------------------------------- model facts



def model_facts(model: torch.nn.Module, scope=None) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity overall and in ``scope`` (default: the block Linears), 2:4 layers."""
    from lotus_deploy.masks import weight_stats
    from lotus_deploy.scope import DEFAULT_SCOPE, select_weights

    scope = list(scope or DEFAULT_SCOPE)
    whole = weight_stats(model)
    sc = weight_stats(model, list(select_weights(model, scope)))
    from lotus_deploy.prune.two_four import two_four_layers

    tf = two_four_layers(model)
    return {
        "params": whole["params"], "nonzeros": whole["nonzeros"], "sparsity": whole["sparsity"], "scope": scope,
        "scope_params": sc["params"], "scope_nonzeros": sc["nonzeros"], "scope_sparsity": sc["sparsity"],
        "linear_layers": sum(isinstance(m, torch.nn.Linear) for m in model.modules()),
        "two_four_layers": len(tf), "two_four_layer_names": tf,
    }


def resolve_variants(run, requested: list[str]) -> list[dict]:
    """Variant names -> ``{"name", "aliases", "entry"}``, one per distinct checkpoint.

    ``all`` means: ``initial``, every finished stage that saved a model (in order), ``dense``,
    ``final``. A name whose checkpoint (sha256) was already listed becomes an alias of it.

    Raises:
        RunError: an unknown variant name.
    """
    entries = run.variants()
    names: list[str] = []
    for v in requested:
        if v == "all":
            made = [e["name"] for e in run.manifest["stages"] if e["status"] == "done" and "model" in e.get("artifacts", {})]
            names += ["initial", *made, "dense", "final"]
        elif v not in entries:
            raise RunError(f"no variant {v!r} in {run.dir}; have: all, {', '.join(entries)}")
        else:
            names.append(v)
    out: list[dict] = []
    by_sha: dict[str, dict] = {}
    for n in names:
        sha = entries[n]["artifacts"]["model"]["sha256"]
        if sha in by_sha:
            if n != by_sha[sha]["name"] and n not in by_sha[sha]["aliases"]:
                by_sha[sha]["aliases"].append(n)
            continue
        by_sha[sha] = {"name": n, "aliases": [], "entry": entries[n]}
        out.append(by_sha[sha])
    return out


# ----------------------------------------------------------------------------- accuracy and pipeline


def accuracy_pass(predict: Callable[[torch.Tensor], torch.Tensor], loader) -> dict[str, Any]:
    """Top-1 (%) of ``predict``'s own logits over ``loader``; also the logits ``(N, classes)``."""
    from lotus_deploy.metrics import top1_loop

    r = top1_loop({"p": predict}, loader, keep_logits=True)["p"]
    return {"top1": r["top1"], "images": r["images"], "logits": torch.from_numpy(r["logits"]), "seconds": r["seconds"]}


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


def _sweep_points(metrics: dict) -> int | None:
    """Evaluations a sweep ran: its ``evaluations`` count (dense + points x scopes), else the length
    of its point table."""
    for key in ("evaluations", "points", "table"):
        v = metrics.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, list) and v:
            return len(v)
    return None


def sweep_efficiency(manifest: dict, eval_images: int, forward_images_per_s: float) -> list[dict]:
    """For each finished ``essential_sparsity`` stage: wall time / (points x one forward pass over
    the eval set at ``forward_images_per_s``). Goal <= 1.1. The sweep ran earlier, in its own
    process: the ratio is only meaningful on the machine and device the run used."""
    out = []
    for e in manifest.get("stages", []):
        if e.get("kind") != "essential_sparsity" or e.get("status") != "done":
            continue
        m = e.get("metrics", {})
        pts = _sweep_points(m)
        wall = m.get("sweep_wall_s", e["wall_s"])
        ideal = pts * eval_images / forward_images_per_s if pts else None
        out.append({
            "stage": e["name"], "wall_s": wall, "points": pts, "ideal_s": ideal,
            "ratio": wall / ideal if ideal else None, "stage_cost_ratio": m.get("cost_ratio"),
            "note": "sweep wall time / (evaluations x eval images / forward images/s measured by this bench)"
            if pts else "the stage's metrics do not say how many points it swept",
        })
    return out


# ----------------------------------------------------------------------------- environment


def bench_environment(threads: int) -> dict[str, Any]:
    """:func:`lotus_deploy.pipeline.environment` plus threads, ONNX Runtime providers, GPU driver and cuDNN."""
    import shutil
    import subprocess

    from lotus_deploy.run import environment

    env = environment()
    env["bench_threads"] = threads
    env["torch_interop_threads"] = torch.get_num_interop_threads()
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_driver"] = None
        if shutil.which("nvidia-smi"):
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
                env["gpu_driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
            except (OSError, subprocess.SubprocessError):
                pass
    return env


# ----------------------------------------------------------------------------- the benchmark


def _batch(example: torch.Tensor, bs: int) -> torch.Tensor:
    """``bs`` images from ``example`` (repeated when the eval set is smaller)."""
    reps = math.ceil(bs / len(example))
    return example.repeat(reps, 1, 1, 1)[:bs].contiguous() if reps > 1 else example[:bs].contiguous()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def run_bench(run, cfg, out_dir: Path, log: Callable[[str], Any] = print, data=None) -> dict:
    """Benchmark the variants of a run; writes results.json/.csv, report.md and plots in ``out_dir``.

    Args:
        run: an opened :class:`lotus_deploy.pipeline.Run`.
        cfg: a :class:`lotus_deploy.config.BenchConfig`.
        data: a DataBundle to reuse (else built from the recipe).

    Returns:
        The results as a JSON-able dict (:class:`BenchResults`).

    Raises:
        RunError: unknown variant or backend name.
    """
    from lotus_deploy.bench.report import mark_pareto, write_outputs
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
            statuses[b.name] = BackendStatus(name=b.name, description=b.description, device=b.device, status="skipped" if why else "failed", reason=why)
            if why:
                log(f"bench: skipping {b.name}: {why}")
            else:
                ready.append(b)
        facts_out, acc_out, rows, failures = [], [], [], []
        spec = None
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
                            arms[(pv["name"], bname)] = Timed((lambda p=p, s=staged: p.forward(s)), p.sync, p.cuda_events)
                            if BACKENDS[bname].device != "cpu":
                                copies[(pv["name"], bname)] = {
                                    "h2d": time_fn(lambda p=p: p.stage(x), 2, cfg.iters, sync=p.sync)["median_ms"],
                                    "d2h": time_fn(lambda p=p, y=y: p.to_logits(y), 2, cfg.iters, sync=p.sync)["median_ms"],
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

        for v in variants:
            name = v["name"]
            model, masks = run.load(name)
            apply_masks_(model, masks)
            spec = input_spec(model)
            if data is None:
                data = build_data(run.recipe.data, spec)
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
            )
            prepared: dict[str, Prepared] = {}
            for b in ready:
                try:
                    prepared[b.name] = b.prepare(model, ctx)
                    statuses[b.name].info = prepared[b.name].info
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
                    acc[bname] = {
                        "variant": name, "backend": bname, "top1": a["top1"], "images": a["images"],
                        "agreement": (a["logits"].argmax(1) == ref["logits"].argmax(1)).float().mean().item(),
                        "max_abs_logit_diff": (a["logits"] - ref["logits"]).abs().max().item(), "seconds": a["seconds"],
                    }
                    acc_out.append(acc[bname])
            facts_out.append(facts)
            pending.append({"name": name, "facts": facts, "prepared": prepared, "acc": acc})
            del model, prepared
            if cfg.interleave == "backends":
                time_pending()
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


__all__ = [
    "BACKENDS", "register_backend", "BenchResults", "load_results", "results_path", "run_bench", "time_fn", "time_arms",
    "latency_stats", "percentile", "model_facts", "resolve_variants", "accuracy_pass",
    "pipeline_efficiency", "sweep_efficiency", "ResultsError",
]
