"""lotus_deploy.bench.pareto: fronts of (latency, accuracy) points and their marks in the rows."""

from __future__ import annotations

import random

import pytest

from lotus_deploy.bench.pareto import front_line, mark_pareto, pareto_front


@pytest.mark.parametrize(
    "points, expected",
    [
        pytest.param([(1, 50), (2, 60), (3, 55), (4, 70)], [True, True, False, True], id="staircase"),
        pytest.param([(1, 50), (1, 50)], [True, True], id="ties-both-on"),
        pytest.param([(1, 50), (1, 40)], [True, False], id="same-latency-less-accurate"),
        pytest.param([(2, 50), (1, 50)], [False, True], id="same-accuracy-slower"),
        pytest.param([(5, 90)], [True], id="single"),
    ],
)
def test_pareto_front_synthetic(points, expected):
    assert pareto_front(points) == expected


def test_pareto_front_random_points_invariants():
    rng = random.Random(1)
    pts = [(rng.uniform(1, 100), rng.uniform(0, 100)) for _ in range(200)]
    on = pareto_front(pts)
    front = [p for p, o in zip(pts, on) if o]
    dominates = lambda a, b: a[0] <= b[0] and a[1] >= b[1] and a != b  # noqa: E731
    assert front and all(not any(dominates(q, p) for q in pts) for p in front)
    assert all(any(dominates(q, p) for q in front) for p, o in zip(pts, on) if not o)
    line = front_line(pts)
    assert [p[0] for p in line] == sorted(p[0] for p in line)
    assert all(a[1] < b[1] for a, b in zip(line, line[1:]))  # slower points on the front are more accurate


def test_mark_pareto_per_backend_and_batch_table():
    rows = [
        {"backend": "x", "batch": 1, "latency_median_ms": 1.0, "top1": 50.0},
        {"backend": "x", "batch": 1, "latency_median_ms": 2.0, "top1": 40.0},
        {"backend": "y", "batch": 1, "latency_median_ms": 9.0, "top1": 40.0},  # alone in its table
        {"backend": "x", "batch": 8, "latency_median_ms": 3.0, "top1": None},  # no accuracy: never marked
    ]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [True, False, True, False]
