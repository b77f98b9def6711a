"""Latency of callables: warm-up, then timed calls in rounds that interleave the arms.

Latency in ms. CPU arms use the wall clock (``time.perf_counter``), waiting for device work with
the arm's ``sync`` before and after each call; CUDA arms (``cuda_events``) use events recorded on
the current stream. torch is imported only for CUDA events.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable


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
    """One timed call of ``arm`` (ms)."""
    if arm.cuda_events:
        import torch

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
