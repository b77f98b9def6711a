"""Early-bird ticket detection: stop looking once the magnitude mask stops changing.

Following You et al. (ICLR 2020, "Drawing early-bird tickets") as applied to ViTs in "Early
Transformers" (Cheng et al., arXiv 2405.02353): at each check the magnitude mask at the target
sparsity is computed; the last ``window`` masks are kept, and the normalized Hamming distance
between the newest mask and each earlier one is taken. When the window is full and the largest
of those distances is below ``threshold``, the ticket (the newest mask) is drawn.

The detector works on mask sets only (pure data in, records out); the fine-tuning stage wires
it into training through the ``on_step`` / ``on_epoch`` hooks of :func:`lotus_deploy.train.train`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Mapping

import torch

from lotus_deploy.masks import Masks, hamming, masks_hash


class EarlyBirdDetector:
    """Sliding-window mask-distance test.

    Args:
        window: masks kept, the newest included (>= 2).
        threshold: the ticket is drawn when every distance in a full window is below this
            (normalized Hamming distance, a fraction of the weights in scope).
    """

    def __init__(self, window: int = 5, threshold: float = 0.1):
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.window = window
        self.threshold = threshold
        self._queue: deque[Masks] = deque(maxlen=window)
        self.checks: list[dict[str, Any]] = []
        self.drawn: dict[str, Any] | None = None
        self.ticket: Masks | None = None

    def update(self, masks: Mapping[str, torch.Tensor], **where: Any) -> bool:
        """Add the mask of one check; True exactly at the check where the ticket is drawn.

        Args:
            masks: the magnitude mask set at this check (copied to CPU).
            where: position of the check (``step``, ``epoch``, ...), stored in its record.

        Returns:
            True when this check draws the ticket (only once; later checks return False).
        """
        newest = {k: v.detach().to("cpu", torch.bool).clone() for k, v in masks.items()}
        self._queue.append(newest)
        distances = [hamming(newest, m) for m in list(self._queue)[:-1]]  # oldest first
        largest = max(distances) if distances else None
        drawn_now = (
            self.drawn is None and len(self._queue) == self.window and largest is not None and largest < self.threshold
        )
        rec = {"check": len(self.checks) + 1, **where, "distances": distances, "max_distance": largest, "drawn": drawn_now}
        self.checks.append(rec)
        if drawn_now:
            self.drawn = {k: v for k, v in rec.items() if k != "distances"}
            self.ticket = newest
        return drawn_now

    def summary(self) -> dict[str, Any]:
        """JSON-able record: settings, every check's distances (to each earlier mask in the window,
        oldest first) and largest distance, where the ticket was drawn."""
        return {
            "window": self.window,
            "threshold": self.threshold,
            "checks": [dict(c) for c in self.checks],
            "drawn": self.drawn,
            "ticket_masks_hash": masks_hash(self.ticket) if self.ticket is not None else None,
        }


class EarlyBirdWatch:
    """Wires an :class:`EarlyBirdDetector` into :func:`lotus_deploy.train.train` hooks.

    At each check (every ``every`` optimizer steps, or every epoch when ``every="epoch"``) the
    global magnitude mask of the model's in-scope weights at ``sparsity`` is computed (masks
    already in force stay pruned) and fed to the detector.

    Args:
        model: the model being trained (read only).
        scope: scope patterns of the weights whose mask is tracked.
        sparsity: target sparsity of the tracked mask (fraction).
        every: ``"epoch"`` or a step interval.
        stop: make the hook return True (stop training) when the ticket is drawn.
        steps_per_epoch: to report fractional epochs for step checks.
        existing: masks in force during training.
    """

    def __init__(self, model, scope, sparsity: float, detector: EarlyBirdDetector, every="epoch", stop: bool = False,
                 steps_per_epoch: int = 1, existing: Mapping[str, torch.Tensor] | None = None, log=None):
        from lotus_deploy.scope import select_weights

        self.params = select_weights(model, scope)
        if not self.params:
            raise ValueError(f"early_bird scope {list(scope)} selects no prunable weights")
        self.sparsity = float(sparsity)
        self.detector = detector
        self.every = every
        self.stop = stop
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.existing = {k: v for k, v in (existing or {}).items() if k in self.params} or None
        self.log = log or (lambda msg: None)
        self.provenance: dict[str, Any] = {}  # where a knee-word sparsity came from (manifest)

    def current_masks(self) -> Masks:
        """The magnitude mask of the model's weights right now (pure; model untouched)."""
        from lotus_deploy.masks import magnitude_masks

        return magnitude_masks({k: p.detach() for k, p in self.params.items()}, self.sparsity, "global", self.existing)

    def _check(self, step: int, epoch: float, **extra) -> bool:
        drawn = self.detector.update(self.current_masks(), step=step, epoch=round(epoch, 4), **extra)
        rec = self.detector.checks[-1]
        if rec["max_distance"] is not None:
            self.log(f"early-bird check {rec['check']} (step {step}): max distance {rec['max_distance']:.4f}")
        if drawn:
            self.log(f"early-bird ticket drawn at check {rec['check']} (step {step}, epoch {epoch:.2f})"
                     + ("; stopping" if self.stop else ""))
        return drawn and self.stop

    def on_step(self, step: int) -> bool:
        if self.every != "epoch" and step % int(self.every) == 0:
            return self._check(step, step / self.steps_per_epoch)
        return False

    def on_epoch(self, epoch: int, rec: dict) -> bool:
        if self.every == "epoch":
            extra = {"eval_top1": rec["eval_top1"]} if "eval_top1" in rec else {}
            return self._check(rec["step"], float(epoch), **extra)
        return False

    def hooks(self) -> dict:
        """The keyword arguments for ``train()``: ``on_epoch`` or ``on_step``."""
        return {"on_epoch": self.on_epoch} if self.every == "epoch" else {"on_step": self.on_step}

    def finish(self, out_dir) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write ``early_bird.png`` (+ ``early_bird_masks.safetensors`` when drawn) to ``out_dir``.

        Returns:
            (metrics: the detector summary plus ``sparsity``, ``every``, ``stopped`` and
            ``final_distance`` = Hamming distance between the ticket and the mask of the weights
            at the end of training; artifacts name -> path).
        """
        from pathlib import Path

        from lotus_deploy.files import save_tensors
        from lotus_deploy.plots import plot_early_bird

        out_dir = Path(out_dir)
        det = self.detector
        metrics = {**det.summary(), "sparsity": self.sparsity, "every": self.every, "stop": self.stop}
        metrics["stopped"] = det.drawn is not None and self.stop
        metrics["final_distance"] = hamming(det.ticket, self.current_masks()) if det.ticket is not None else None
        xkey = "epoch" if self.every == "epoch" else "step"
        arts = {"early_bird_png": plot_early_bird(
            out_dir / "early_bird.png", [c[xkey] for c in det.checks], [c["max_distance"] for c in det.checks],
            det.threshold, det.drawn[xkey] if det.drawn else None, xlabel=xkey,
        )}
        if det.ticket is not None:
            arts["early_bird_masks"] = save_tensors(
                out_dir / "early_bird_masks.safetensors", det.ticket,
                metadata={"sparsity": str(self.sparsity), "check": str(det.drawn["check"]), "step": str(det.drawn["step"])},
            )
        return metrics, arts
