"""The one top-1 loop: accuracy of one or more predictors over ``(inputs, labels)`` batches.

Every accuracy in lotus (training evaluation, evaluation on tickets, the bench's per-backend
accuracy, engine vs ONNX Runtime) goes through :func:`top1_loop`, so top-1 / top-5 / loss mean
the same thing everywhere. Predictors may return torch tensors or numpy arrays of logits.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def _cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)  # (B, C)
    logz = np.log(np.exp(z).sum(axis=1))  # (B,)
    return float((logz - z[np.arange(len(labels)), labels]).sum())


class TopK:
    """Running top-1 / top-5 (%) and mean cross-entropy of one predictor."""

    def __init__(self, keep_logits: bool = False):
        self.n = self.correct1 = self.correct5 = 0
        self.loss_sum = 0.0
        self.keep_logits = keep_logits
        self.logits: list[np.ndarray] = []

    def add(self, logits: Any, labels: Any) -> None:
        lg, y = _numpy(logits), np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64)  # (B, C), (B,)
        k = min(5, lg.shape[1])
        top = np.argpartition(-lg, k - 1, axis=1)[:, :k]  # (B, k): the k largest, in any order
        self.correct1 += int((lg.argmax(1) == y).sum())
        self.correct5 += int((top == y[:, None]).any(1).sum())
        self.loss_sum += _cross_entropy_sum(lg.astype(np.float64), y)
        self.n += len(y)
        if self.keep_logits:
            self.logits.append(lg)

    def counts(self) -> list[float]:
        """``[images, top-1 hits, top-5 hits, summed loss]``: what sums over shards of a split."""
        return [self.n, self.correct1, self.correct5, self.loss_sum]

    def set_counts(self, counts: list[float]) -> None:
        """Replace the running counts (by the sums over every shard: :meth:`counts`)."""
        n, c1, c5, loss = counts
        self.n, self.correct1, self.correct5, self.loss_sum = round(n), round(c1), round(c5), float(loss)

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        out: dict[str, Any] = {
            "top1": 100.0 * self.correct1 / n, "top5": 100.0 * self.correct5 / n,
            "loss": self.loss_sum / n if self.n else math.nan, "images": self.n,
        }
        if self.keep_logits:
            out["logits"] = np.concatenate(self.logits) if self.logits else np.zeros((0, 0), np.float32)
        return out


def top1_loop(
    predictors: Mapping[str, Callable[[Any], Any]], batches: Iterable, keep_logits: bool = False,
    to_inputs: Callable[[Any], Any] | None = None, reduce: Callable[[list[float]], list[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every predictor on every batch once; top-1/top-5 (%), loss, images and time per predictor.

    Args:
        predictors: name -> ``fn(inputs) -> logits (B, classes)``.
        batches: ``(inputs, labels)`` pairs; ``inputs`` may be a tuple (e.g. images and ticket indices).
        keep_logits: also return each predictor's logits as ``logits`` ``(N, classes)`` (numpy).
        to_inputs: maps a batch's inputs before prediction (e.g. move to a device).
        reduce: sums a list of counts over the shards of a split (a distributed all-reduce:
            ``batches`` are this rank's shard); the results then cover the whole split.

    Returns:
        name -> ``top1``, ``top5``, ``loss``, ``images``, ``seconds`` (wall time of the whole loop,
        data loading included, s), ``images_per_s`` (images / seconds), ``predict_seconds`` (time
        inside this predictor, s) (and ``logits``).
    """
    acc = {k: TopK(keep_logits) for k in predictors}
    seconds = {k: 0.0 for k in predictors}
    t_start = time.perf_counter()
    for inputs, labels in batches:
        if to_inputs is not None:
            inputs = to_inputs(inputs)
        for name, fn in predictors.items():
            t0 = time.perf_counter()
            logits = fn(inputs)
            seconds[name] += time.perf_counter() - t0
            acc[name].add(logits, labels)
    wall = time.perf_counter() - t_start
    if reduce is not None:
        if keep_logits:
            raise ValueError("keep_logits needs every batch in this process: logits are not gathered over shards")
        for a in acc.values():
            a.set_counts(reduce(a.counts()))
    out = {}
    for name, a in acc.items():
        r = a.result()
        r["seconds"] = wall
        r["images_per_s"] = r["images"] / wall if wall > 0 else math.nan
        r["predict_seconds"] = seconds[name]
        out[name] = r
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (fraction) and max |a - b| of two logit arrays ``(N, classes)``."""
    if len(a) == 0:
        return {"top1_agreement": math.nan, "max_abs_diff": math.nan}
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_abs_diff": float(np.abs(a - b).max())}
