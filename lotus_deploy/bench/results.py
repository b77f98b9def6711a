"""The bench's results schema: ``results.json``, versioned, read back by :func:`load_results`.

Latency in ms; images/s = batch / median latency; accuracy in percent top-1; sparsity = fraction
of zero weights. Nothing here measures or imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

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


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendStatus(_Schema):
    """One requested backend: measured, skipped (unavailable here) or failed (raised while running)."""

    name: str
    description: str
    device: str
    precision: str = "fp32"
    family: str | None = None
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
