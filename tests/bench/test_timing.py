"""lotus_deploy.bench.timing: percentiles, latency statistics, arms interleaved in rounds."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from lotus_deploy.bench.timing import (
    Timed,
    latency_stats,
    percentile,
    time_arms,
    time_fn,
)


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0], ids=lambda q: f"q{q:g}")
def test_percentile_matches_numpy_linear_interpolation(q):
    vals = sorted(random.Random(0).uniform(0, 10) for _ in range(37))
    assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, 100 * q)))


def test_percentile_of_nothing_fails():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_latency_stats_known_values():
    s = latency_stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0 and s["iters"] == 5
    assert s["median_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["mean_ms"] == pytest.approx(22.0) and s["timer"] == "wall"
    assert latency_stats([2.0])["std_ms"] == 0.0  # one call: no spread


def test_time_arms_interleaves_and_counts():
    calls: list[str] = []
    arms = {n: Timed(lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    res = time_arms(arms, warmup=2, iters=6, rounds=3)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, arm by arm
    timed = calls[6:]
    assert all(res[n]["iters"] == 6 for n in arms) and len(timed) == 18
    # 3 rounds of 2 calls per arm, the order rotating between rounds
    assert [timed[i] for i in (0, 6, 12)] == ["a", "b", "c"]
    assert set(timed[:6]) == set(timed[6:12]) == {"a", "b", "c"}


@pytest.mark.parametrize("iters, min_seconds", [(1, 0.03), (3, 0.02), (8, 0.0)], ids=["seconds-bound", "both", "iters-bound"])
def test_time_arms_honours_iters_and_min_seconds(iters, min_seconds):
    """Timing stops only when the arm has >= iters calls and >= min_seconds of them. Whatever the
    load, a sleep never returns early, so these invariants hold exactly (the count does not)."""
    s = time_arms({"sleep": Timed(lambda: time.sleep(0.002))}, warmup=0, iters=iters, min_seconds=min_seconds, rounds=1)["sleep"]
    assert s["iters"] >= iters and s["timer"] == "wall"
    assert s["min_ms"] >= 2.0  # time.sleep never returns early
    assert s["mean_ms"] * s["iters"] >= 1e3 * min_seconds - 1e-6  # the sum of the timed calls


def test_time_fn_calls_sync_around_each_timed_call():
    events: list[str] = []
    s = time_fn(lambda: events.append("fn"), warmup=1, iters=3, sync=lambda: events.append("sync"))
    assert s["iters"] == 3
    # warm-up then one sync; then sync before and after every timed call
    assert events == ["fn", "sync"] + ["sync", "fn", "sync"] * 3
