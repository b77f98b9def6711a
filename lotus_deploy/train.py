"""Training and evaluation loops shared by every stage that trains or measures a model."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from lotus_deploy.distributed import all_reduce_sum, wrap_ddp
from lotus_deploy.errors import RunError
from lotus_deploy.masks import apply_masks_
from lotus_deploy.progress import bar


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    forward: Callable[..., torch.Tensor] | None = None,
    desc: str = "eval",
    shard: bool = True,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and throughput over ``loader``.

    In a distributed run (:mod:`lotus_deploy.distributed`) a DataLoader in dataset order is
    split between the ranks (strided, no padding: every image on exactly one rank) and the
    counts are summed over the ranks, so every rank gets the numbers of the whole split.

    Args:
        loader: ``(x, y)`` batches, or ``(x, y, idx)`` (ticket batches: ``forward(x, idx)``).
        forward: replaces ``model(x)`` (e.g. a token-dropping forward); default the model.
        shard: False keeps every rank on the whole loader (no communication).

    Returns:
        ``top1``, ``top5`` (percent), ``loss``, ``images`` (all ranks), ``seconds`` (this rank's
        wall time), ``images_per_s`` (all ranks' images / that time).
    """
    from lotus_deploy import distributed as dist
    from lotus_deploy.metrics import top1_loop

    reduce = None
    if shard and dist.active():
        from lotus_deploy.data import shard_eval_loader

        sharded = shard_eval_loader(loader)
        if sharded is not None:
            loader, reduce = sharded, lambda v: dist.all_reduce_sum(v, what=f"{desc} counts")

    was_training = model.training
    model.eval()
    fwd = forward or model

    def batches():
        for b in bar(loader, desc=desc, unit="batch"):
            x, y, *rest = b
            yield (x, *rest), y

    def predict(inputs):
        inputs = tuple(t.to(device, non_blocking=True) for t in inputs)
        with autocast(device):
            return fwd(*inputs).float()  # (B, classes)

    try:
        r = top1_loop({"model": predict}, batches(), reduce=reduce)["model"]
    finally:
        model.train(was_training)
    return {k: r[k] for k in ("top1", "top5", "loss", "images", "seconds", "images_per_s")}


def autocast(device: torch.device):
    """The precision policy of every forward lotus runs: bf16 autocast on CUDA, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def param_groups(
    model: nn.Module, train: str, lr: float, backbone_lr: float | None, weight_decay: float
) -> list[dict]:
    """AdamW groups: head vs backbone learning rates, no weight decay on 1-D params and tokens.

    Args:
        train: ``head`` (only the classifier trains; the rest is frozen) or ``all``.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        is_head = id(p) in head_ids
        if train == "head" and not is_head:
            p.requires_grad_(False)
            continue
        p.requires_grad_(True)
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "reg_token", "gamma")) or ".ls" in name
        groups.setdefault((is_head, no_decay), []).append(p)
    out = []
    for (is_head, no_decay), params in groups.items():
        out.append({
            "params": params,
            "lr": lr if is_head or backbone_lr is None else backbone_lr,
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
    return out


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distill_loss(label_loss: torch.Tensor, logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * label_loss + alpha * T² * KL(softmax(teacher / T) || softmax(student / T)).

    The KL divergence is summed over classes and averaged over the batch; T² keeps the soft
    term's gradients the size of the label loss's (Hinton et al., 2015).

    Args:
        logits, teacher_logits: (B, classes) of the student and the teacher.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * label_loss + alpha * t * t * kl


class Distiller:
    """Loss hook of :func:`train` that mixes the label loss with a frozen teacher's soft targets.

    The teacher runs on the full images the loader yields (for token-dropped training every
    patch, while the student sees the kept tokens), in eval mode, without gradients; it is never
    updated.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, label_loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # not inference_mode: its tensors cannot be saved for the student's backward
            teacher_logits = self.teacher(x)  # (B, classes)
        return distill_loss(label_loss, logits, teacher_logits, self.alpha, self.temperature)


class NonFiniteLoss(RunError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainSpec:
    """A training run: what trains, for how long, how fast (pure data for :func:`train`)."""

    train: str = "all"
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 1e-3
    backbone_lr: float | None = None
    weight_decay: float = 0.05
    warmup: float = 0.1
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    eval_every_epoch: bool = True


def train(
    model: nn.Module,
    spec: TrainSpec,
    make_loader: Callable[[int], Iterable],
    steps_per_epoch: int,
    device: torch.device,
    masks: Mapping[str, torch.Tensor] | None = None,
    evaluate_fn: Callable[[], dict] | None = None,
    on_step: Callable[[int], bool] | None = None,
    on_epoch: Callable[[int, dict], bool] | None = None,
    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    distill: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
    desc: str = "train",
) -> list[dict]:
    """Train ``model`` in place with AdamW and the spec's schedule; masks stay enforced.

    Masks present are applied before the first step and after *every* optimizer step, so
    pruned weights remain exactly zero. Stops after ``spec.steps`` steps if given, else after
    ``spec.epochs`` epochs (fractions allowed); ``on_step``/``on_epoch`` returning True stops
    early (early-bird tickets).

    In a distributed run the model (or ``forward`` over it) trains under DistributedDataParallel:
    ``make_loader`` then yields this rank's share of each global batch
    (:meth:`lotus_deploy.data.DataBundle.train_loader`), every rank the same number of steps; a
    non-finite loss on any rank stops every rank at the same step, and the epoch's loss and
    accuracy are over all ranks.

    Args:
        make_loader: epoch index -> iterable of ``(images, labels)`` (or ``(images, labels,
            extra)`` passed to ``forward``).
        steps_per_epoch: batches in one epoch of ``make_loader``.
        distill: loss hook ``(label loss, logits, images) -> loss`` (a :class:`Distiller`).

    Returns:
        One dict per epoch: ``epoch``, ``step``, ``train_loss``, ``train_acc``, ``lr``,
        ``seconds`` and the eval metrics prefixed ``eval_``.
    """
    total = spec.steps if spec.steps is not None else max(1, int(round(spec.epochs * steps_per_epoch)))
    warmup = int(round(spec.warmup * total)) if spec.warmup < 1 else int(spec.warmup)
    groups = param_groups(model, spec.train, spec.lr, spec.backbone_lr, spec.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, lr=spec.lr)
    masks = dict(masks or {})
    if masks:
        apply_masks_(model, masks)
    history: list[dict] = []
    step, epoch, stop = 0, 0, False
    amp = autocast(device)
    model.to(device).train()
    ddp = wrap_ddp(model, device, forward)  # None unless distributed
    run = ddp if ddp is not None else (forward or model)
    while step < total and not stop:
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        it = bar(make_loader(epoch), desc=f"{desc} epoch {epoch + 1}", total=min(steps_per_epoch, total - step), unit="step")
        for batch in it:
            x, y = batch[0].to(device), batch[1].to(device)
            extra = batch[2].to(device) if len(batch) > 2 else None
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, total, warmup, spec.schedule)
            with amp:
                logits = run(x, extra) if forward is not None else run(x)  # (B, classes)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=spec.label_smoothing)
                if distill is not None:
                    loss = distill(loss, logits, x)
            if not finite_everywhere(loss, ddp is not None):
                raise NonFiniteLoss(
                    f"{desc}: non-finite loss ({loss.item()}) at step {step + 1} (lr {opt.param_groups[0]['lr']:.3g}); the stage stops and "
                    "its model is not saved (the last good checkpoint stays); lower lr / backbone_lr or set grad_clip"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            opt.step()
            if masks:
                apply_masks_(model, masks)
            step += 1
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
            if hasattr(it, "set_postfix"):
                it.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None and on_step(step):
                stop = True
            if stop or step >= total:
                break
        epoch += 1
        if ddp is not None:
            loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], what=f"{desc} epoch {epoch} totals")
        rec = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": 100.0 * correct / max(seen, 1),
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if evaluate_fn is not None and (spec.eval_every_epoch or step >= total or stop):
            rec.update({f"eval_{k}": v for k, v in evaluate_fn().items()})
            model.train()
        history.append(rec)
        log(
            f"{desc} epoch {epoch}: step {step}/{total} loss {rec['train_loss']:.4f} "
            f"train {rec['train_acc']:.2f}%" + (f" eval {rec['eval_top1']:.2f}%" if "eval_top1" in rec else "")
        )
        if on_epoch is not None and on_epoch(epoch, rec):
            stop = True
    return history


def finite_everywhere(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on this rank, and with ``distributed`` on every rank."""
    ok = bool(torch.isfinite(loss))
    if distributed:
        ok = all_reduce_sum([0.0 if ok else 1.0], what="the finite-loss check")[0] == 0.0
    return ok
