"""Recipe sections as pydantic v2 models (pure data, ``extra="forbid"``).

Stage configs subclass :class:`StageConfig` and live next to their implementation in
``lotus_deploy/stages``; :mod:`lotus_deploy.recipe` assembles them into the discriminated
``stages`` union.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from lotus_deploy.files import CHECKPOINT_SUFFIXES
from lotus_deploy.scope import check_pattern


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_scope(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("scope must name at least one pattern")
    return [check_pattern(p) for p in v]


Scope = Annotated[list[str], AfterValidator(_check_scope)]
"""Layer patterns in the scope grammar of :mod:`lotus_deploy.scope`."""

Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="fraction of weights in scope set to zero, in [0, 1)")]

KNEE_VALUES: tuple[str, ...] = ("knee", "knee_curvature")
"""Sparsity words resolved from the latest ``essential_sparsity`` stage: its tolerance knee
(``knee``) or its curvature (Kneedle) knee (``knee_curvature``)."""

SparsityOrKnee = Annotated[
    Union[Sparsity, Literal["knee", "knee_curvature"]],
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


class ExportConfig(Strict):
    """ONNX export settings (used by the `export` stage and `lotus export`)."""

    opset: int = Field(17, ge=13, description="ONNX opset")
    dynamo: bool = Field(False, description="use the dynamo exporter (slower; the TorchScript one is the default)")
    tolerance: float = Field(1e-3, gt=0, description="max |ONNX Runtime - PyTorch| on eval logits before the export fails")
    check_images: int = Field(64, gt=0, description="eval images compared between ONNX Runtime and PyTorch")


class BenchConfig(Strict):
    """Benchmark settings (used by the `bench` stage and `lotus bench`)."""

    variants: list[str] = Field(default_factory=lambda: ["all"], description="model states to measure: all (initial, every stage that saved a model, dense, final; same checkpoints measured once), or initial, dense, final, stage names")
    backends: list[str] = Field(default_factory=lambda: ["auto"], description="registered backends (`lotus_deploy.backends`), auto (the default ones available here; the rest listed with the reason) or all")
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
    ``makes_masks``; ``ends_masks`` (e.g. ``bake`` removes them).
    """

    needs_masks: ClassVar[bool] = False
    makes_masks: ClassVar[bool] = False
    ends_masks: ClassVar[bool] = False

    kind: str
    name: str | None = Field(None, description="stage name (run directory, variant name); default: the kind, numbered if repeated")
