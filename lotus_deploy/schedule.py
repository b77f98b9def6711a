"""One optimizer and one learning-rate schedule carried across several training segments.

:func:`lotus_deploy.train.train` builds a fresh AdamW and a schedule over its own steps at every
call. Instant Soup Pruning's main model (Jaiswal et al., ICML 2023, as their released code runs
it) trains in many short segments, one per soup round and then the final fine-tune, with ONE
AdamW and ONE warm-up -> decay schedule over all of them. :class:`ScheduledTrainer` holds that
optimizer, the :class:`Schedule` and the global step; each :meth:`ScheduledTrainer.train` call
runs the next segment, and :meth:`~ScheduledTrainer.state_tensors` /
:meth:`~ScheduledTrainer.load_state_tensors` save and restore the optimizer's moments and the
step, so a resumed run continues exactly where the saved one was.

In a distributed run (:mod:`lotus_deploy.distributed`) each segment trains the model under
DistributedDataParallel: the segment's loader yields this rank's share of every global batch
(:func:`lotus_deploy.prune.soup.fraction_batches` with ``shard``,
:meth:`lotus_deploy.data.DataBundle.train_loader`), the gradients are averaged over the ranks,
and every rank takes the same optimizer step, so the weights (and Adam's moments) stay
identical on every rank. A non-finite loss on any rank stops every rank at the same step.

The learning-rate arithmetic is :func:`lotus_deploy.train.lr_factor` and the AdamW groups are
:func:`lotus_deploy.train.param_groups` (head vs backbone rates, no decay on 1-D weights), so a
segment trains as :func:`~lotus_deploy.train.train` would at the same global step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from lotus_deploy.distributed import all_reduce_sum, wrap_ddp
from lotus_deploy.masks import apply_masks_
from lotus_deploy.progress import bar
from lotus_deploy.train import (
    NonFiniteLoss,
    autocast,
    finite_everywhere,
    lr_factor,
    param_groups,
)

OPTIM_PREFIX = "optim/"  # tensor keys of the optimizer state in a checkpoint: optim/<param index>/<name>


@dataclass(frozen=True)
class Schedule:
    """Multiplier of the base learning rates at a global step: linear warm-up, then decay or constant.

    Attributes:
        total: optimizer steps of the whole schedule.
        warmup: warm-up steps; step ``i < warmup`` uses ``(i + 1) / warmup``.
        kind: after the warm-up, ``cosine`` (to 0 at ``total``) or ``constant``.
    """

    total: int
    warmup: int
    kind: str = "cosine"

    @classmethod
    def of(cls, total: int, warmup: float, kind: str) -> "Schedule":
        """The schedule over ``total`` steps with ``warmup`` a fraction of them if < 1, else a step count."""
        steps = int(round(warmup * total)) if warmup < 1 else int(warmup)
        return cls(total=total, warmup=min(steps, total), kind=kind)

    def factor(self, step: int) -> float:
        """The multiplier at global ``step`` (0-based), as :func:`lotus_deploy.train.lr_factor`."""
        return lr_factor(step, self.total, self.warmup, self.kind)


class ScheduledTrainer:
    """AdamW on ``model`` whose learning rates follow one :class:`Schedule` over every segment trained.

    Args:
        model: trained in place; its parameters must stay the same objects between segments
            (load a checkpoint with ``load_state_dict``, never replace the module).
        lr, backbone_lr: peak learning rates of the head and of the rest (None: ``lr``).
        grad_clip: clip the gradient norm to this before each step (0 or None: no clipping).
    """

    def __init__(self, model: nn.Module, schedule: Schedule, lr: float, backbone_lr: float | None,
                 weight_decay: float, label_smoothing: float = 0.0, grad_clip: float | None = None,
                 device: torch.device | None = None):
        self.model, self.schedule = model, schedule
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.device = device or torch.device("cpu")
        groups = param_groups(model, "all", lr, backbone_lr, weight_decay)
        self.base_lrs = [g["lr"] for g in groups]
        self.peak_lr = lr  # the head's
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        self.step = 0  # global optimizer steps taken

    def lrs(self, step: int | None = None) -> list[float]:
        """Each parameter group's learning rate at global ``step`` (default the next one)."""
        f = self.schedule.factor(self.step if step is None else step)
        return [base * f for base in self.base_lrs]

    def train(self, make_loader: Callable[[int], Iterable], steps: int, masks: Mapping[str, torch.Tensor] | None = None,
              log: Callable[[str], None] | None = None, desc: str = "train") -> list[dict]:
        """Run the next ``steps`` optimizer steps of the schedule; masks stay enforced.

        Args:
            make_loader: epoch index (0-based, within this segment) -> ``(images, labels)`` batches;
                the segment moves to the next epoch when one runs out.
            steps: steps of this segment; the schedule must have them left.

        Returns:
            One record per epoch touched: ``epoch``, ``step`` (global, after it), ``steps``,
            ``images``, ``train_loss``, ``train_acc``, ``lr`` (the head's, at its last step), ``seconds``.

        Raises:
            ValueError: ``steps`` goes past the schedule's ``total``.
            NonFiniteLoss: a NaN or infinite loss.
        """
        if self.step + steps > self.schedule.total:
            raise ValueError(f"{desc}: {steps} steps from step {self.step} go past the schedule's {self.schedule.total}")
        masks = dict(masks or {})
        model = self.model.to(self.device).train()
        if masks:
            apply_masks_(model, masks)
        ddp = wrap_ddp(model, self.device)  # None unless distributed; dropped with this segment
        history: list[dict] = []
        end, epoch = self.step + steps, 0
        while self.step < end:
            rec = self._epoch(make_loader(epoch), end, masks, f"{desc} epoch {epoch + 1}", ddp)
            if rec["steps"] == 0:
                raise ValueError(f"{desc}: the loader of epoch {epoch + 1} yielded no batch")
            history.append({"epoch": epoch + 1, **rec})
            if log is not None:
                log(f"{desc} epoch {epoch + 1}: step {self.step}/{self.schedule.total} loss {rec['train_loss']:.4f} "
                    f"train {rec['train_acc']:.2f}% lr {rec['lr']:.3g}")
            epoch += 1
        self.optimizer.zero_grad(set_to_none=True)  # no gradients kept between segments (nor copied with the model)
        return history

    def _epoch(self, batches: Iterable, end: int, masks: dict, desc: str, ddp: nn.Module | None = None) -> dict:
        """Steps on ``batches`` until they run out or the global step reaches ``end``.

        Args:
            ddp: the model under DistributedDataParallel (distributed run), else None; its
                forward averages the gradients over the ranks in ``backward``, and the epoch's
                loss, accuracy and images are summed over the ranks.
        """
        t0 = time.perf_counter()
        first = self.step
        loss_sum, correct, seen = 0.0, 0, 0
        it = bar(batches, desc=desc, unit="step")
        for batch in it:
            x, y = batch[0].to(self.device), batch[1].to(self.device)  # (B, C, H, W), (B,)
            for g, lr in zip(self.optimizer.param_groups, self.lrs()):
                g["lr"] = lr
            with autocast(self.device):
                logits = (ddp or self.model)(x)  # (B, classes); B is this rank's share under DDP
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            if not finite_everywhere(loss, ddp is not None):
                raise NonFiniteLoss(f"{desc}: non-finite loss ({loss.item()}) at global step {self.step + 1} "
                                    f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); lower lr / backbone_lr or set grad_clip")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            if masks:
                apply_masks_(self.model, masks)
            self.step += 1
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
            if self.step >= end:
                break
        if ddp is not None:
            loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], what=f"{desc} totals")
            seen = round(seen)
        return {"step": self.step, "steps": self.step - first, "images": seen, "train_loss": loss_sum / max(seen, 1),
                "train_acc": 100.0 * correct / max(seen, 1), "lr": self.peak_lr * self.schedule.factor(self.step - 1),
                "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------------- checkpoint

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The optimizer's moments as tensors (``optim/<param>/<name>``) and the rest as string metadata.

        Everything :meth:`load_state_tensors` needs to continue bit for bit: Adam's moments and
        per-parameter step counters, the group settings, the global step and the schedule.
        """
        sd = self.optimizer.state_dict()
        tensors = {f"{OPTIM_PREFIX}{i}/{name}": v for i, st in sd["state"].items() for name, v in st.items()}
        meta = {"optim_groups": json.dumps(sd["param_groups"]), "optim_step": str(self.step),
                "optim_schedule": json.dumps([self.schedule.total, self.schedule.warmup, self.schedule.kind])}
        return tensors, meta

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> None:
        """Restore what :meth:`state_tensors` saved (tensors may hold other keys; they are ignored).

        Raises:
            ValueError: the saved schedule is not this trainer's.
        """
        saved = json.loads(meta["optim_schedule"])
        if saved != [self.schedule.total, self.schedule.warmup, self.schedule.kind]:
            raise ValueError(f"saved schedule {saved} is not this run's {self.schedule}")
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith(OPTIM_PREFIX):
                idx, name = key[len(OPTIM_PREFIX):].split("/", 1)
                state.setdefault(int(idx), {})[name] = v
        groups = json.loads(meta["optim_groups"])
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(meta["optim_step"])


