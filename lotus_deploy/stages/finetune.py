"""``finetune``: train the head or the whole model; masks in the state stay enforced."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from ..config import Scope, SparsityOrKnee, StageConfig, Strict
from ..registry import register_stage
from ..scope import DEFAULT_SCOPE


class EarlyBird(Strict):
    """Early-bird ticket detection during fine-tuning (:mod:`lotus_deploy.early_bird`)."""

    sparsity: SparsityOrKnee = Field(description="sparsity of the tracked magnitude mask, or knee / knee_curvature from an essential_sparsity stage")
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="weights whose mask is tracked (global ranking)")
    window: int = Field(5, ge=2, description="masks kept, the newest included")
    threshold: float = Field(0.1, gt=0, le=1, description="draw the ticket when the largest normalized Hamming distance in a full window is below this")
    every: Union[Literal["epoch"], Annotated[int, Field(gt=0)]] = Field("epoch", description="check every epoch, or every N optimizer steps")
    stop: bool = Field(False, description="stop training when the ticket is drawn (else only record it)")


class Finetune(StageConfig):
    """AdamW with warm-up then cosine (or constant), evaluated every epoch."""

    kind: Literal["finetune"] = "finetune"
    train: Literal["head", "all"] = Field("all", description="head: only the classifier trains; all: every parameter")
    epochs: float | None = Field(None, gt=0, description="epochs over the training split (fractions allowed)")
    steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the head (and of the backbone unless backbone_lr)")
    backbone_lr: float | None = Field(None, gt=0, description="peak learning rate of everything but the head")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, tokens)")
    warmup: float = Field(0.1, ge=0, description="warm-up: a fraction of the steps if < 1, else a step count")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm")
    batch_size: int | None = Field(None, gt=0, description="default: data.batch_size")
    eval_every_epoch: bool = Field(True, description="evaluate after each epoch (else only at the end)")
    early_bird: EarlyBird | None = Field(None, description="detect the early-bird ticket; distances and early_bird_masks.safetensors in the stage directory")

    @model_validator(mode="after")
    def _length(self) -> "Finetune":
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        return self

    def train_spec(self):
        from ..train import TrainSpec

        return TrainSpec(
            train=self.train, epochs=self.epochs or 1.0, steps=self.steps, lr=self.lr, backbone_lr=self.backbone_lr,
            weight_decay=self.weight_decay, warmup=self.warmup, schedule=self.schedule,
            label_smoothing=self.label_smoothing, grad_clip=self.grad_clip, eval_every_epoch=self.eval_every_epoch,
        )


def run_training(cfg: Finetune, state, forward=None, make_loader=None, steps_per_epoch=None, **hooks):
    """Train ``state.model`` per ``cfg`` with the state's masks; shared by training stages.

    Returns:
        (history, final eval metrics).
    """
    from ..train import train

    data = state.data
    bs = cfg.batch_size or data.cfg.batch_size
    seed = state.seed()
    if make_loader is None:
        def make_loader(epoch: int):
            return data.train_loader(seed=seed + 1 + epoch, batch_size=bs)

        steps_per_epoch = math.ceil(len(data.train) / bs)
    history = train(
        state.model, cfg.train_spec(), make_loader, steps_per_epoch, state.device, masks=state.masks,
        evaluate_fn=lambda: state.evaluate(desc=f"{state.stage_name} eval"), forward=forward,
        log=state.log.info, desc=state.stage_name, **hooks,
    )
    final = {k[5:]: v for k, v in history[-1].items() if k.startswith("eval_")} if history else {}
    if not final:
        final = state.evaluate()
    return history, final


def write_history(state, history: list[dict]):
    """history.csv of per-epoch metrics in the stage directory."""
    import csv
    import io

    from ..io import write_text

    keys = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return write_text(state.stage_dir / "history.csv", buf.getvalue())


@register_stage(Finetune)
def finetune(cfg: Finetune, state):
    from ..state import StageResult

    watch = _early_bird_watch(cfg, state) if cfg.early_bird is not None else None
    history, final = run_training(cfg, state, **(watch.hooks() if watch else {}))
    path = write_history(state, history)
    metrics = {"top1": final["top1"], "top5": final["top5"], "eval_loss": final["loss"], "history": history}
    artifacts = {"history": path}
    if watch is not None:
        metrics["early_bird"], eb_arts = watch.finish(state.stage_dir)
        metrics["early_bird"].update(steps_trained=history[-1]["step"] if history else 0, **watch.provenance)
        artifacts.update(eb_arts)
    return StageResult(metrics=metrics, artifacts=artifacts)


def _early_bird_watch(cfg: Finetune, state):
    """The early-bird hooks for this stage (sparsity words resolved from the sweep)."""
    from ..early_bird import EarlyBirdDetector, EarlyBirdWatch
    from .sparsity import resolve_sparsity

    eb = cfg.early_bird
    sparsity, provenance = resolve_sparsity(eb.sparsity, state, eb.scope)
    bs = cfg.batch_size or state.data.cfg.batch_size
    watch = EarlyBirdWatch(
        state.model, eb.scope, sparsity, EarlyBirdDetector(eb.window, eb.threshold), every=eb.every, stop=eb.stop,
        steps_per_epoch=math.ceil(len(state.data.train) / bs), existing=state.masks, log=state.log.info,
    )
    watch.provenance = provenance
    return watch
