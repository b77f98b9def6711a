"""``finetune``: train the head or the whole model; masks in the state stay enforced."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from ..config import StageConfig
from ..registry import register_stage


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

    history, final = run_training(cfg, state)
    path = write_history(state, history)
    return StageResult(
        metrics={"top1": final["top1"], "top5": final["top5"], "eval_loss": final["loss"], "history": history},
        artifacts={"history": path},
    )
