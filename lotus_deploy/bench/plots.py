"""The bench's figures: accuracy vs latency (with the Pareto front) and accuracy vs sparsity.

Drawn on :func:`lotus_deploy.plots.new_figure` (own Agg canvas, no pyplot state) and written
atomically by :func:`lotus_deploy.plots.save_figure`. Imports matplotlib: import it lazily.
Latency in ms (log axis), accuracy in percent top-1, sparsity = fraction of zero weights.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from lotus_deploy.bench.pareto import front_line
from lotus_deploy.bench.results import BenchResults
from lotus_deploy.plots import new_figure, save_figure

MARKERS = "osD^v<>pPhX*"


def plot_pareto(res: BenchResults, path: str | Path) -> Path:
    """Accuracy vs median latency, one panel per batch size, one marker per variant x backend,
    the front over all backends of the panel drawn as a staircase."""
    batches = sorted({r.batch for r in res.rows}) or [0]
    backends = sorted({r.backend for r in res.rows})
    fig = new_figure(5.2 * len(batches), 4.4)
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, bs in zip(axes, batches):
        rows = [r for r in res.rows if r.batch == bs and r.top1 is not None]
        for i, b in enumerate(backends):
            pts = [r for r in rows if r.backend == b]
            if pts:
                ax.scatter([r.latency_median_ms for r in pts], [r.top1 for r in pts], marker=MARKERS[i % len(MARKERS)], s=46, label=b, zorder=3)
        for j, r in enumerate(_label_points(rows)):  # one label per variant, alternating above/below
            ax.annotate(r.variant, (r.latency_median_ms, r.top1), fontsize=7, xytext=(4, 4 if j % 2 == 0 else -10),
                        textcoords="offset points")
        front = front_line([(r.latency_median_ms, r.top1) for r in rows])
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="k", lw=1.0, alpha=0.6, zorder=2)
            ax.scatter(xs, ys, s=130, facecolors="none", edgecolors="k", lw=1.0, label="Pareto front", zorder=4)
        if not rows:
            ax.text(0.5, 0.5, "no accuracy measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("median latency (ms, log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"batch {bs}")
        ax.grid(alpha=0.3, which="both")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{res.recipe}: accuracy vs latency")
    return save_figure(fig, path)


def _label_points(rows) -> list:
    """The row that carries each variant's label: its fastest backend (labels do not pile up)."""
    best: dict[str, object] = {}
    for r in rows:
        if r.variant not in best or r.latency_median_ms < best[r.variant].latency_median_ms:
            best[r.variant] = r
    return sorted(best.values(), key=lambda r: r.latency_median_ms)


def plot_sparsity(res: BenchResults, path: str | Path) -> Path:
    """Top-1 vs scope sparsity of each variant, one series per backend, points labelled by variant."""
    sparsity = {v.variant: v.scope_sparsity for v in res.variants}
    fig = new_figure(6.4, 4.4)
    ax = fig.add_subplot()
    by_backend: dict[str, list] = defaultdict(list)
    for a in res.accuracy:
        by_backend[a.backend].append((sparsity[a.variant], a.top1, a.variant))
    for i, (b, pts) in enumerate(sorted(by_backend.items())):  # later backends hollow and larger: overlaps stay visible
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)], s=40 + 30 * i,
                   facecolors=None if i == 0 else "none", edgecolors=f"C{i}", color=f"C{i}" if i == 0 else None, label=b, zorder=3 - 0.1 * i)
    for v in res.variants:
        if v.reference_top1 is not None:
            ax.annotate(v.variant, (v.scope_sparsity, v.reference_top1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if not by_backend:
        ax.text(0.5, 0.5, "no accuracy measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("sparsity of the scope (fraction of weights that are zero)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{res.recipe}: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    if by_backend:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
