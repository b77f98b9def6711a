"""Pareto fronts of (latency, accuracy) points: no other point is at least as fast and as accurate.

Latency in ms, accuracy in percent top-1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which ``(latency, accuracy)`` points no other point dominates.

    A point is dominated when another one is at most as slow and at least as accurate, and
    strictly better in one of the two. Equal points are all on the front.
    """
    out = []
    for i, (lat, acc) in enumerate(points):
        dominated = any(
            j != i and l2 <= lat and a2 >= acc and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points)
        )
        out.append(not dominated)
    return out


def front_line(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The front's points sorted by latency (the staircase to draw)."""
    on = pareto_front(points)
    return sorted((p for p, o in zip(points, on) if o), key=lambda p: (p[0], -p[1]))


def mark_pareto(rows: list[dict]) -> None:
    """Set ``row["pareto"]`` within each (backend, batch) table; rows without top-1 are never on it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        r["pareto"] = False
        if r.get("top1") is not None:
            groups[(r["backend"], r["batch"])].append(r)
    for g in groups.values():
        for r, on in zip(g, pareto_front([(r["latency_median_ms"], r["top1"]) for r in g])):
            r["pareto"] = on
