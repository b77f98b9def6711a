"""What a bench row is measured against: the model's facts, the run's variants, the machine.

* :func:`model_facts`: parameters, non-zeros and sparsity (overall and in the scope), 2:4 layers;
* :func:`resolve_variants`: variant names of a run -> one entry per distinct checkpoint;
* :func:`sweep_efficiency`: essential-sparsity sweeps of the manifest against the forward speed;
* :func:`bench_environment`: versions, threads, ONNX Runtime providers, the CPU's int8
  instructions (:func:`cpu_int8_flags`), GPU driver and cuDNN.

Sparsity = fraction of zero weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import torch

from lotus_deploy.errors import RunError
from lotus_deploy.masks import weight_stats
from lotus_deploy.prune.two_four import two_four_layers
from lotus_deploy.run import environment
from lotus_deploy.scope import DEFAULT_SCOPE, select_weights


def model_facts(model: torch.nn.Module, scope=None) -> dict[str, Any]:
    """Parameters, non-zeros, sparsity overall and in ``scope`` (default: the block Linears), 2:4 layers."""
    scope = list(scope or DEFAULT_SCOPE)
    whole = weight_stats(model)
    sc = weight_stats(model, list(select_weights(model, scope)))
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


def cpu_int8_flags(cpuinfo: str | None = None) -> dict[str, list[str]]:
    """The CPU's VNNI and AMX flags (``/proc/cpuinfo``; empty lists when absent or unreadable).

    ONNX Runtime's int8 GEMMs (the MatMulInteger / QDQ-fused kernels an int8 ONNX runs on) use
    AVX-512 VNNI / AVX-VNNI and AMX where the CPU has them; without them int8 gains little on a CPU.

    Args:
        cpuinfo: the file's text (default: read it).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
    return {"vnni": sorted(f for f in flags if "vnni" in f), "amx": sorted(f for f in flags if f.startswith("amx"))}


def bench_environment(threads: int) -> dict[str, Any]:
    """:func:`lotus_deploy.run.environment` plus threads, ONNX Runtime providers, the CPU's int8
    instructions (``cpu_int8``: :func:`cpu_int8_flags`), GPU driver and cuDNN."""
    env = environment()
    env["cpu_int8"] = cpu_int8_flags()
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
