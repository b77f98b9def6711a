"""Recipe sections as pydantic v2 models (pure data, ``extra="forbid"``).

Stage configs subclass :class:`StageConfig` and live next to their implementation in
``lotus_deploy/stages``; :mod:`lotus_deploy.recipe` assembles them into the discriminated
``stages`` union.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from lotus_deploy.files import CHECKPOINT_SUFFIXES
from lotus_deploy.scope import check_pattern

MAX_EPOCHS = 10_000
"""Upper bound of every epochs field (a typo such as ``1e30`` is refused, not run forever)."""
MAX_STEPS = 100_000_000
"""Upper bound of every optimizer-steps field."""


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_scope(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("scope must name at least one pattern")
    return [check_pattern(p) for p in v]


Scope = Annotated[list[str], AfterValidator(_check_scope)]
"""Layer patterns in the scope grammar of :mod:`lotus_deploy.scope`."""

Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of weights in scope set to zero, in [0, 1)")]

KneeWord = Literal["knee", "knee_curvature"]
"""Sparsity words resolved from the latest ``essential_sparsity`` stage: its tolerance knee
(``knee``) or its curvature (Kneedle) knee (``knee_curvature``). The same words name the knees
in the sweep's metrics and its ``apply`` field."""

KNEE_VALUES: tuple[str, ...] = typing.get_args(KneeWord)

SparsityOrKnee = Annotated[
    Union[Sparsity, KneeWord],
    Field(description="fraction of weights in scope set to zero, in [0, 1), or knee / knee_curvature from an earlier essential_sparsity stage"),
]


class ModelConfig(Strict):
    """Which timm model to build and where its weights come from."""

    name: str = Field(description="timm model name, optionally with a pretrained tag (`vit_small_patch14_dinov2.lvd142m`)")
    weights: Path | None = Field(None, description="local .safetensors or .pth file loaded through timm (positional embeddings resampled)")
    pretrained: bool = Field(False, description="download the timm pretrained weights (needs internet) when `weights` is not set")
    img_size: int | None = Field(None, gt=0, description="input resolution in pixels; default: the model's own")
    num_classes: int = Field(gt=0, description="classifier outputs")
    kwargs: dict[str, object] = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")

    @field_validator("weights")
    @classmethod
    def _weights_suffix(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"weights must be a {', '.join(CHECKPOINT_SUFFIXES)} file, got {v.name!r}")
        return v


class DataConfig(Strict):
    """Dataset, subsets and loader settings."""

    kind: Literal["cifar10", "imagefolder", "digits"] = Field(description="cifar10 (torchvision or an ImageFolder train/ test/ tree), imagefolder (train/ and test/ or val/), digits (scikit-learn, no download)")
    root: Path | None = Field(None, description="dataset root; required for imagefolder")
    download: bool = Field(False, description="cifar10 only: let torchvision download it (needs internet)")
    batch_size: int = Field(64, gt=0, description="training batch size (images)")
    eval_batch_size: int | None = Field(None, gt=0, description="evaluation batch size; default: batch_size")
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    train_subset: int | None = Field(None, gt=0, description="class-balanced seeded subset of the training split (images)")
    eval_subset: int | None = Field(None, gt=0, description="class-balanced seeded subset of the eval split (images)")
    subset_seed: int = Field(0, description="seed of the subsets (kept apart from the run seed)")
    augment: Literal["none", "crop", "crop_flip"] = Field("crop_flip", description="training augmentation at the source resolution, before the resize: pad-4 random crop (crop), plus horizontal flip (crop_flip)")
    cache_eval: bool = Field(True, description="decode, resize and normalize the eval split once and keep it in memory")
    bad_images: Literal["fail", "skip"] = Field("fail", description="an unreadable image: fail naming it, or skip it (the next readable image of its class is used in its place, and counted)")


TRAIN_FIELDS: tuple[str, ...] = ("lr", "backbone_lr", "weight_decay", "warmup", "schedule", "grad_clip", "label_smoothing", "batch_size")
"""The :class:`TrainConfig` fields a training stage inherits (``lr`` first: ``backbone_lr`` may scale it)."""


class TrainConfig(Strict):
    """Training defaults (``train:``) of every training stage: a stage field left unset takes these.

    Chosen safe for fine-tuning a pretrained ViT, close to the reference fine-tune (head lr 1e-3,
    backbone lr 3e-5, weight decay 0.05, 10 % warm-up then cosine, label smoothing 0.1, batch 64).
    The backbone learns at ``lr * backbone_lr_scale`` (1/30: 3.3e-5 for the head's 1e-3) unless
    ``backbone_lr`` is set: a pretrained backbone trained at the head's rate forgets its features
    (issue 14: a soup at 1e-3 everywhere fell from 84 % to chance). A ratio rather than a fixed
    3e-5, so a stage that lowers its ``lr`` (a recovery at 3e-4) lowers the backbone's with it
    (1e-5). A model trained from scratch sets ``backbone_lr_scale: 1`` (one rate everywhere).
    """

    lr: float = Field(1e-3, gt=0, description="peak learning rate of the head")
    backbone_lr: float | None = Field(None, gt=0, description="peak learning rate of everything but the head; default lr * backbone_lr_scale")
    backbone_lr_scale: float = Field(1 / 30, gt=0, le=1, description="backbone lr as a fraction of the stage's lr when backbone_lr is unset (1: one lr everywhere, for models trained from scratch)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on norms, biases, tokens)")
    warmup: float = Field(0.1, ge=0, description="warm-up: a fraction of the steps if < 1, else a step count")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0: no clipping")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")
    batch_size: int | None = Field(None, gt=0, description="training batch size (images); default data.batch_size")

    def resolve(self, stage: "StageConfig", data_batch_size: int) -> "StageConfig":
        """``stage`` with its unset (None) ``train_fields`` taken from this section.

        Args:
            data_batch_size: ``data.batch_size`` (images), when neither sets ``batch_size``.

        Returns:
            a copy with the fields filled, or ``stage`` itself when none was unset.
        """
        update: dict[str, object] = {}
        for field, src in stage.train_fields.items():  # lr comes first: backbone_lr may scale it
            if getattr(stage, field) is not None:
                continue
            if src == "backbone_lr" and self.backbone_lr is None:
                update[field] = update.get("lr", stage.lr) * self.backbone_lr_scale  # type: ignore[operator]
            elif src == "batch_size":
                update[field] = self.batch_size or data_batch_size
            else:
                update[field] = getattr(self, src)
        return stage.model_copy(update=update) if update else stage


class ExportConfig(Strict):
    """ONNX export settings (used by the `export` stage and `lotus export`)."""

    opset: int = Field(17, ge=13, description="ONNX opset")
    dynamo: bool = Field(False, description="use torch's dynamo exporter (slower; the TorchScript one is the default); needs onnxscript: the `dynamo` (or `precision`) extra, checked before the run starts")
    tolerance: float = Field(1e-3, gt=0, description="max |ONNX Runtime - PyTorch| on eval logits before the export fails")
    check_images: int = Field(64, gt=0, description="eval images compared between ONNX Runtime and PyTorch")
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field("fp32", description="precision of the ONNX TensorRT builds from, made by `lotus export` (default of its --precision): fp16/bf16 (ModelOpt AutoCast) or int8/fp8 (ModelOpt Q/DQ post-training quantization) write model.<precision>.onnx next to model.onnx, fp32 inputs/outputs kept, checked against it on eval images; needs the `precision` extra")
    calibration_images: int = Field(128, gt=0, description="int8/fp8: train-split images (eval transform, class-balanced, seeded) that calibrate the activation ranges")
    precision_images: int = Field(512, gt=0, description="eval images on which the converted ONNX is checked against the fp32 ONNX (ONNX Runtime CPU)")


class BenchConfig(Strict):
    """Benchmark settings (used by the `bench` stage and `lotus bench`)."""

    variants: list[str] = Field(default_factory=lambda: ["all"], description="model states to measure: all (initial, every stage that saved a model, dense, final; same checkpoints measured once), or initial, dense, final, stage names")
    backends: list[str] = Field(default_factory=lambda: ["auto"], description="registered backends (`lotus_deploy.bench.backends`), auto (the default ones available here; the rest listed with the reason) or all")
    batch_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [1, 8], description="latency batch sizes (images)")
    warmup: int = Field(5, ge=0, description="untimed iterations before timing")
    iters: int = Field(30, gt=0, description="timed iterations per batch size (at least)")
    min_seconds: float = Field(0.0, ge=0, description="keep timing until this many seconds passed")
    accuracy: bool = Field(True, description="measure each variant's accuracy on the eval split with each backend")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch and ONNX Runtime; default: torch's")
    rounds: int = Field(5, gt=0, description="timed iterations are split into this many rounds that interleave the arms")
    interleave: Literal["variants", "backends"] = Field("variants", description="variants: every variant x backend timed side by side (all held in memory at once); backends: one variant at a time, its backends side by side")
    pipeline: bool = Field(True, description="measure the eval loop's images/s against the forward's on in-memory tensors (one extra eval pass)")


class StageConfig(Strict):
    """Base of every stage config. Subclasses set ``kind: Literal["..."] = "..."``.

    Class variables declare what the stage needs and provides so one cross-field validator can
    check the order of stages: ``needs_masks`` (a pruning stage must come first) and
    ``makes_masks``; ``ends_masks`` (e.g. ``bake`` removes them); ``changes_model`` (False for stages
    that only read the model: evaluate, export, engine, bench). ``train_fields`` maps the stage's
    training fields to the :class:`TrainConfig` fields they inherit when unset.
    """

    needs_masks: ClassVar[bool] = False
    makes_masks: ClassVar[bool] = False
    ends_masks: ClassVar[bool] = False
    changes_model: ClassVar[bool] = True
    train_fields: ClassVar[dict[str, str]] = {}

    kind: str
    name: str | None = Field(None, description="stage name (run directory, variant name); default: the kind, numbered if repeated")
