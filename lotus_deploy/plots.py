"""Matplotlib figures written by stages (Agg canvas per figure, no pyplot state, atomic PNG writes).

Figures are drawn on their own ``FigureCanvasAgg``, so the process-wide backend is never
changed (importing lotus in a notebook keeps its backend).

Import this module lazily (inside stage functions): it imports matplotlib. Every function
takes the output path first, draws one figure and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lotus_deploy.files import atomic_path


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    """A figure on its own Agg canvas (no global pyplot state; safe in threads and tests)."""
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def plot_sweep(
    path: str | Path,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    dense_top1: float,
    knees: Mapping[str, Mapping[str, float | None]] | None = None,
    tolerance: float | None = None,
    title: str = "one-shot magnitude sweep",
) -> Path:
    """Top-1 (%) against sparsity (fraction), one curve per scope choice.

    Args:
        curves: curve name -> (sparsity, top1) points.
        dense_top1: accuracy of the dense model (%), drawn as a horizontal line.
        knees: curve name -> ``{"knee": s, "knee_curvature": s}`` (None: not found).
        tolerance: accuracy points; draws the ``dense - tolerance`` line when given.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    ax.axhline(dense_top1, color="0.3", lw=1, ls="--", label=f"dense {dense_top1:.2f}%")
    if tolerance is not None:
        ax.axhline(dense_top1 - tolerance, color="0.6", lw=0.8, ls=":", label=f"dense - {tolerance:g} pt")
    for i, (name, pts) in enumerate(curves.items()):
        color = f"C{i}"
        xs, ys = zip(*sorted(pts)) if pts else ((), ())
        ax.plot(xs, ys, "o-", color=color, ms=3.5, label=name)
        k = (knees or {}).get(name, {})
        lookup = dict(pts)
        if k.get("knee") is not None and k["knee"] in lookup:
            x = k["knee"]
            ax.plot([x], [lookup[x]], marker="*", ms=14, color=color, mec="k", ls="none", label=f"{name} knee {x:g}")
        if k.get("knee_curvature") is not None and k["knee_curvature"] in lookup:
            x = k["knee_curvature"]
            ax.plot([x], [lookup[x]], marker="D", ms=7, mfc="none", mec=color, mew=1.5, ls="none",
                    label=f"{name} curvature knee {x:g}")
    ax.set_xlabel("sparsity (fraction of weights in scope set to zero)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


def plot_early_bird(
    path: str | Path,
    xs: Sequence[float],
    distances: Sequence[float | None],
    threshold: float,
    drawn_x: float | None = None,
    xlabel: str = "step",
) -> Path:
    """Largest normalized Hamming distance in the mask window at each check.

    Args:
        xs: position of each check (step or epoch).
        distances: the window's largest distance at each check (None before two masks exist).
        threshold: the drawing threshold (horizontal line).
        drawn_x: where the ticket was drawn (vertical line), if it was.
    """
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    pts = [(x, d) for x, d in zip(xs, distances) if d is not None]
    if pts:
        px, py = zip(*pts)
        ax.plot(px, py, "o-", ms=3.5, label="max distance in window")
        if min(py) > 0 and min(py) < threshold / 10:  # distances far below the threshold: log scale
            ax.set_yscale("log")
    ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"threshold {threshold:g}")
    if drawn_x is not None:
        ax.axvline(drawn_x, color="C2", lw=1.2, label=f"ticket drawn at {xlabel} {drawn_x:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("normalized Hamming distance")
    ax.set_title("early-bird mask distance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_soup_rounds(path: str | Path, rounds: Sequence[Mapping], target: float) -> Path:
    """Per-round sparsity (left) and accuracies (right) of an instant-soup run.

    Args:
        rounds: round records with ``round``, ``start_sparsity``, ``sparsity`` and optionally ``learner_top1`` (list),
            ``combined_top1`` and ``main_top1`` (%).
        target: the target sparsity (horizontal line on the left panel).
    """
    fig = new_figure(9.6, 3.6)
    a, b = fig.subplots(1, 2)
    from matplotlib.ticker import MaxNLocator

    r = [0] + [rec["round"] for rec in rounds]
    a.plot(r, [rounds[0]["start_sparsity"]] + [rec["sparsity"] for rec in rounds], "o-", label="after round (0: start)")
    a.axhline(target, color="C3", ls="--", lw=1, label=f"target {target:g}")
    a.set_xlabel("round")
    a.set_ylabel("sparsity")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    for rec in rounds:
        accs = rec.get("learner_top1") or []
        b.plot([rec["round"]] * len(accs), accs, "x", color="0.5", ms=5)
    for key, style in (("combined_top1", "o-"), ("main_top1", "s-")):
        pts = [(rec["round"], rec[key]) for rec in rounds if rec.get(key) is not None]
        if pts:
            x, y = zip(*pts)
            b.plot(x, y, style, ms=4, label=key.replace("_top1", ""))
    b.plot([], [], "x", color="0.5", label="learners")
    b.set_xlabel("round")
    b.set_ylabel("top-1 (%)")
    b.grid(alpha=0.3)
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("instant soup rounds")
    return save_figure(fig, path)


def plot_tickets(
    path: str | Path, images, shown, labels: Sequence[str] | None = None, title: str = "", cols: int = 8
) -> Path:
    """Data lottery tickets (LOTUS Figure 3): each image above its ticket.

    Args:
        images: (B, 3, H, W) tensor in [0, 1], the training images.
        shown: (B, 3, H, W) tensor in [0, 1], the same images with dropped patches greyed
            (:func:`lotus_deploy.tickets.grey_dropped`).
        labels: class name per image (titles).
    """
    n = images.shape[0]
    cols = max(1, min(n, cols))
    rows = -(-n // cols)
    fig = new_figure(1.6 * cols, 3.4 * rows)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        axes[2 * r, c].imshow(images[i].permute(1, 2, 0).numpy())
        axes[2 * r + 1, c].imshow(shown[i].permute(1, 2, 0).numpy())
        if labels is not None:
            axes[2 * r, c].set_title(str(labels[i]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_training_curves(path: str | Path, history: Sequence[Mapping], title: str = "") -> Path:
    """Per-epoch top-1 (%) and cross-entropy loss (LOTUS Figure 4) from a training history.

    Args:
        history: per-epoch records with ``epoch``, ``train_acc``, ``train_loss`` and, where
            evaluated, ``eval_top1``/``eval_loss`` (all patches) and ``eval_ticket_top1``/
            ``eval_ticket_loss`` (ticket patches).
    """
    fig = new_figure(9.6, 3.6)
    a, b = fig.subplots(1, 2)
    for ax, keys in (
        (a, (("train_acc", "train"), ("eval_top1", "eval, all patches"), ("eval_ticket_top1", "eval, ticket patches"))),
        (b, (("train_loss", "train"), ("eval_loss", "eval, all patches"), ("eval_ticket_loss", "eval, ticket patches"))),
    ):
        for key, label in keys:
            pts = [(h["epoch"], h[key]) for h in history if key in h]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, "o-", ms=3.5, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.3)
    a.set_ylabel("top-1 (%)")
    b.set_ylabel("cross-entropy loss")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
