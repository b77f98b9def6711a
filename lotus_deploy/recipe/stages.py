"""Stage configs: pure data, one class per stage kind (torchao style).

Each config names its implementation module in ``impl``; :func:`lotus_deploy.stages.stage_fn`
imports it only when the stage runs, so reading a recipe (``lotus validate``, serving a run)
never imports training code. Every config class here registers its ``kind`` in
:data:`STAGE_CONFIGS`, a registry that refuses duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from lotus_deploy.recipe.base import (
    MAX_EPOCHS,
    MAX_STEPS,
    TRAIN_FIELDS,
    KneeWord,
    Scope,
    Sparsity,
    SparsityOrKnee,
    StageConfig,
    Strict,
)
from lotus_deploy.registry import Registry
from lotus_deploy.scope import DEFAULT_SCOPE

DEFAULT_SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(11))  # 0, 0.05, ..., 0.5
PRIMARY = "scope"  # curve name of the `scope` field (the extra `scopes` are named by the user)

CriterionName = Literal["magnitude", "wanda", "sparsegpt"]
"""Pruning criteria by recipe name (:data:`lotus_deploy.prune.criteria.CRITERIA`; a test keeps both in step)."""
Granularity = Literal["global", "per_layer", "per_row"]
"""Where a sparsity is met exactly: over the whole scope, per weight tensor, or per output row
(:mod:`lotus_deploy.prune.criteria`); sparsegpt takes global (each layer at the same fraction) or per_layer."""
CALIBRATION_IMAGES = 256
CALIBRATION_DOC = "train-split images (eval transform, class-balanced, seeded) whose Linear inputs calibrate wanda / sparsegpt (unused by magnitude)"

STAGE_CONFIGS: Registry[type[StageConfig]] = Registry("stage kind")


class EarlyBird(Strict):
    """Early-bird ticket detection during fine-tuning (:mod:`lotus_deploy.prune.early_bird`)."""

    sparsity: SparsityOrKnee = Field(description="sparsity of the tracked magnitude mask, or knee / knee_curvature from an essential_sparsity stage")
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="weights whose mask is tracked (global ranking)")
    window: int = Field(5, ge=2, description="masks kept, the newest included")
    threshold: float = Field(0.1, gt=0, le=1, description="draw the ticket when the largest normalized Hamming distance in a full window is below this")
    every: Union[Literal["epoch"], Annotated[int, Field(gt=0)]] = Field("epoch", description="check every epoch, or every N optimizer steps")
    stop: bool = Field(False, description="stop training when the ticket is drawn (else only record it)")


class Distill(Strict):
    """Knowledge distillation (Hinton et al., 2015) from a frozen variant of the run.

    loss = (1 - alpha) * label loss + alpha * T² * KL(softmax(teacher / T) || softmax(student / T)).
    Defaults as SparseML's distillation examples (hardness 0.5, temperature 2).
    """

    teacher: str = Field("dense", description="finished variant that teaches: dense (the model before the first pruning stage), initial, or an earlier stage's name")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (0: labels only, 1: teacher only)")
    temperature: float = Field(2.0, gt=0, description="softens both distributions; the KL term is scaled by T² so its gradients keep their size")


class Finetune(StageConfig):
    """AdamW with warm-up then cosine (or constant), evaluated every epoch.

    Optimizer fields left unset take the recipe's ``train:`` section (:class:`~lotus_deploy.recipe.base.TrainConfig`).
    """

    kind: Literal["finetune"] = "finetune"
    impl: ClassVar[str] = "lotus_deploy.stages.finetune"
    train: Literal["head", "all"] = Field("all", description="head: only the classifier trains; all: every parameter")
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS, description="epochs over the training split (fractions allowed)")
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="optimizer steps; overrides epochs")
    lr: float | None = Field(None, gt=0, description="peak learning rate of the head; default train.lr")
    backbone_lr: float | None = Field(None, gt=0, description="peak learning rate of everything but the head; default train.backbone_lr, else lr * train.backbone_lr_scale")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay (not on norms, biases, tokens); default train.weight_decay")
    warmup: float | None = Field(None, ge=0, description="warm-up: a fraction of the steps if < 1, else a step count; default train.warmup")
    schedule: Literal["cosine", "constant"] | None = Field(None, description="after warm-up; default train.schedule")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="default train.label_smoothing")
    grad_clip: float | None = Field(None, ge=0, description="clip the gradient norm to this (0: no clipping); default train.grad_clip")
    batch_size: int | None = Field(None, gt=0, description="images per step; default train.batch_size, else data.batch_size")
    eval_every_epoch: bool = Field(True, description="evaluate after each epoch (else only at the end)")
    early_bird: EarlyBird | None = Field(None, description="detect the early-bird ticket; distances and early_bird_masks.safetensors in the stage directory")
    distill: Distill | None = Field(None, description="distil from a finished variant of the run (default dense) while training")

    train_fields: ClassVar[dict[str, str]] = {f: f for f in TRAIN_FIELDS}

    @model_validator(mode="after")
    def _length(self) -> "Finetune":
        if self.epochs is None and self.steps is None:
            self.epochs = 1.0
        return self

    def train_spec(self):
        from lotus_deploy.train import TrainSpec

        return TrainSpec(
            train=self.train, epochs=self.epochs or 1.0, steps=self.steps, lr=self.lr, backbone_lr=self.backbone_lr,
            weight_decay=self.weight_decay, warmup=self.warmup, schedule=self.schedule,
            label_smoothing=self.label_smoothing, grad_clip=self.grad_clip, eval_every_epoch=self.eval_every_epoch,
        )


class MagnitudePrune(StageConfig):
    """One-shot prune of the weights in scope, by ``criterion`` (magnitude by default, global ranking).

    The kind keeps its name ``magnitude_prune`` for the recipes that use it; ``criterion: wanda``
    or ``sparsegpt`` makes it an activation-aware one-shot prune.
    """

    makes_masks: ClassVar[bool] = True

    kind: Literal["magnitude_prune"] = "magnitude_prune"
    impl: ClassVar[str] = "lotus_deploy.stages.prune"
    sparsity: SparsityOrKnee = Field(description="fraction of the weights in scope to zero, in [0, 1), or knee / knee_curvature from an earlier essential_sparsity stage")
    granularity: Granularity = Field("global", description="rank all weights together, per tensor, or per output row (sparsegpt: global or per_layer)")
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="layers to prune (scope grammar)")
    criterion: CriterionName = Field("magnitude", description="magnitude: |W|; wanda: |W| x input-channel norm; sparsegpt: OBS with weight reconstruction")
    calibration_images: int = Field(CALIBRATION_IMAGES, gt=0, description=CALIBRATION_DOC)

    @model_validator(mode="after")
    def _criterion_granularity(self) -> "MagnitudePrune":
        _check_granularity([self.criterion], self.granularity)
        return self


class EssentialSparsity(StageConfig):
    """One-shot sweep; ``knee`` = largest sparsity within ``tolerance`` points of dense, ``knee_curvature`` = Kneedle's.

    One curve per scope and criterion: the ``knee_criterion``'s curves keep the scope names
    (``scope``, the ``scopes`` keys), the others' are named ``<scope>/<criterion>``
    (``scope/wanda``); knees, ``apply`` and later ``sparsity: knee`` stages use the former.
    """

    kind: Literal["essential_sparsity"] = "essential_sparsity"
    impl: ClassVar[str] = "lotus_deploy.stages.sparsity"
    sparsities: list[Sparsity] = Field(
        default_factory=lambda: list(DEFAULT_SWEEP), min_length=1,
        description="sparsities to measure (fractions); 0 (dense) is always measured",
    )
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="layers pruned (scope grammar); its knee is the one later stages use")
    scopes: dict[str, Scope] = Field(
        default_factory=dict,
        description="more scope choices to sweep, name -> patterns; one curve each (a later stage uses the curve whose patterns equal its own scope)",
    )
    granularity: Granularity = Field("global", description="rank all weights in scope together, per tensor, or per output row (sparsegpt: global or per_layer)")
    criteria: list[CriterionName] = Field(default_factory=lambda: ["magnitude"], min_length=1, description="criteria to sweep, one curve each per scope")
    knee_criterion: CriterionName | None = Field(None, description="the criterion whose curves give the knees and `apply` (default the first of criteria)")
    calibration_images: int = Field(CALIBRATION_IMAGES, gt=0, description=CALIBRATION_DOC)
    tolerance: float = Field(1.0, ge=0, description="allowed top-1 drop from dense at the knee, in accuracy points")
    apply: Literal["none", KneeWord] = Field(
        "none", description="none: the sweep only measures (model left dense); knee / knee_curvature: prune `scope` at that knee",
    )

    @property
    def makes_masks(self) -> bool:  # type: ignore[override]
        """Pruning stage only when ``apply`` prunes at a knee."""
        return self.apply != "none"

    @field_validator("sparsities")
    @classmethod
    def _sorted_unique(cls, v: list[float]) -> list[float]:
        return sorted(set(float(x) for x in v) | {0.0})

    @model_validator(mode="after")
    def _names(self) -> "EssentialSparsity":
        if PRIMARY in self.scopes:
            raise ValueError(f"scopes: the name {PRIMARY!r} is taken by the `scope` field's curve")
        if len(set(self.criteria)) != len(self.criteria):
            raise ValueError(f"criteria: {self.criteria} names a criterion twice")
        if self.knee_criterion is not None and self.knee_criterion not in self.criteria:
            raise ValueError(f"knee_criterion {self.knee_criterion!r} is not among criteria {self.criteria}")
        _check_granularity(self.criteria, self.granularity)
        return self

    @property
    def knee_from(self) -> str:
        """The criterion whose curves give the knees."""
        return self.knee_criterion or self.criteria[0]


class InstantSoup(StageConfig):
    """Instant Soup Pruning down to ``sparsity`` as its authors run it, then the one-shot rest and a fine-tune.

    The protocol of the authors' released code (Jaiswal et al., ICML 2023): the main model keeps
    ONE AdamW and ONE warm-up -> decay schedule (``warmup``, ``schedule``) over all its round
    steps and the final fine-tune; each round it trains on ``main_fraction`` of the data; learners
    start from the main model's weights with a fresh AdamW warmed up linearly from zero over their
    steps; gradients are clipped (``grad_clip``, 1.0 from ``train:``). The number of rounds is
    planned from ``step`` before the first one, so the schedule's length is known.

    Optimizer fields left unset take the recipe's ``train:`` section.
    """

    makes_masks: ClassVar[bool] = True
    removed_fields: ClassVar[dict[str, str]] = {
        "round_lr_scale": "removed: the main model follows one warm-up -> decay schedule over rounds and fine-tune and the "
                          "learners warm up from zero, so the rounds no longer run at a constant full rate; lower lr / backbone_lr instead",
        "finetune_warmup": "removed: use warmup, the warm-up of the main model's one schedule over its rounds and the fine-tune",
    }

    kind: Literal["instant_soup"] = "instant_soup"
    impl: ClassVar[str] = "lotus_deploy.stages.soup"
    sparsity: SparsityOrKnee = Field(description="target sparsity of the scope (fraction), or knee / knee_curvature")
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="layers pruned (global ranking by `criterion`)")
    criterion: Literal["magnitude", "wanda"] = Field("magnitude", description="how learners (and the one-shot remainder) rank weights: magnitude, or wanda on each learner's own activations (sparsegpt is not offered: merged masks would drop its reconstructed weights)")
    calibration_images: int = Field(CALIBRATION_IMAGES, gt=0, description=CALIBRATION_DOC)
    start: Union[Literal["input"], SparsityOrKnee] = Field(
        "input", description="where the rounds start: input (the model as it enters: dense unless an earlier stage pruned it; ISP's "
        "default), or first prune one-shot (by `criterion`) to a sparsity: a fraction, knee or knee_curvature (needs an essential_sparsity stage before)",
    )
    learners: int = Field(5, ge=1, description="weak learners per round (union_levels uses one)")
    data_fraction: float = Field(0.1, gt=0, le=1, description="fraction of the training subset each learner trains on")
    learner_epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="epochs over its fraction each learner trains (fresh AdamW, linear warm-up from zero over all its steps)")
    step: float = Field(0.1, gt=0, lt=1, description="fraction of its remaining weights each learner prunes per round (planned: round r's goal is the start pruned r+1 times)")
    combine: Literal["union", "intersection", "vote", "union_levels"] = Field(
        "union", description="how learners' masks merge: union (ISP default), intersection, vote (strict majority), union_levels (LOTUS ISSP ablation)",
    )
    levels: list[Sparsity] | None = Field(
        None, description="union_levels: sparsity levels (fractions); default 3 levels evenly up to the target",
    )
    stop_within: float = Field(0.05, ge=0, lt=1, description="plan rounds until the planned sparsity is within this of the target (fraction); the rest is pruned one-shot")
    max_rounds: int = Field(50, ge=1, description="cap on the planned rounds (a warning is logged when it cuts the plan short)")
    main_fraction: float = Field(0.5, gt=0, le=1, description="fraction of the training subset the main model trains on each round (ISP's iter_training_ratio, 0.5 in the authors' code)")
    main_epochs: float = Field(1.0, ge=0, le=MAX_EPOCHS, description="epochs over its fraction the main model trains each round (0: no main training)")
    lr: float | None = Field(None, gt=0, description="peak learning rate of the head: the main model's schedule and each learner's warm-up; default train.lr")
    backbone_lr: float | None = Field(None, gt=0, description="peak learning rate of everything but the head; default train.backbone_lr, else lr * train.backbone_lr_scale")
    weight_decay: float | None = Field(None, ge=0, description="AdamW weight decay; default train.weight_decay")
    warmup: float | None = Field(None, ge=0, description="warm-up of the main model's one schedule: a fraction of all its steps (rounds and fine-tune) if < 1, else steps; default train.warmup")
    schedule: Literal["cosine", "constant"] | None = Field(None, description="the main model's schedule after the warm-up, over rounds and fine-tune; default train.schedule")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="default train.label_smoothing")
    grad_clip: float | None = Field(None, ge=0, description="clip the gradient norm of learners, main model and fine-tune (0: no clipping); default train.grad_clip (1.0)")
    batch_size: int | None = Field(None, gt=0, description="images per step; default train.batch_size, else data.batch_size")
    prune_remainder: bool = Field(True, description="prune one-shot from the rounds' sparsity to the target (false: stop where the soup stopped)")
    finetune_epochs: float = Field(1.0, ge=0, le=MAX_EPOCHS, description="length of the final fine-tune over the whole training subset (its own, not what the rounds left); it continues the main model's schedule")
    finetune_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="final fine-tune steps; overrides finetune_epochs")
    budget_images: int | None = Field(
        None, gt=0, description="equal-cost protocol: total images seen by learners, main model and fine-tune; the fine-tune gets the whole batches the planned rounds leave (overrides its length)",
    )
    eval_rounds: bool = Field(True, description="evaluate every learner, the combined mask and the main model in each round (eval_images), and the model before the fine-tune (all eval images)")
    eval_images: int | None = Field(None, gt=0, description="round evaluations use N eval images evenly strided over the eval split (default all); the final one uses all")

    train_fields: ClassVar[dict[str, str]] = {f: f for f in TRAIN_FIELDS}  # warmup / schedule: the main model's one schedule

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        if isinstance(data, dict):
            for name, why in cls.removed_fields.items():
                if name in data:
                    raise ValueError(f"{name}: {why}")
        return data

    @model_validator(mode="after")
    def _levels(self) -> "InstantSoup":
        if self.levels is not None and self.combine != "union_levels":
            raise ValueError("levels is only used with combine: union_levels")
        return self


class LotteryFinetune(Finetune):
    """Finetune on the top-K attention patches of each image (or random/all patches as controls).

    Every :class:`Finetune` field applies (schedule, learning rates, ``early_bird``).

    Two ways to drop patches:

    * input-level tickets (``drop_at`` unset): each image's K patches are chosen once, before the
      first block, by the CLS attention of ``blocks``;
    * hierarchical (``drop_at: [3, 6, 9]``, Data-LTH / EViT): the tokens entering each listed
      block are cut to ``keep`` of those that reached it, chosen by the CLS attention of the
      block just before it (in the student's own forward with ``teacher: self``, else in the
      frozen teacher's forward); ``blocks`` does not apply.
    """

    kind: Literal["lottery_finetune"] = "lottery_finetune"  # type: ignore[assignment]
    impl: ClassVar[str] = "lotus_deploy.stages.lottery"
    keep: Annotated[float, Field(gt=0, le=1)] | list[Annotated[float, Field(gt=0, le=1)]] | None = Field(
        None,
        description="fraction of patches kept per image; K = ceil(keep * patches); default 0.9 (the paper drops 10%). "
        "With drop_at: the fraction of the patches entering each location that continue, one value for every "
        "location or a list (one per location); default 0.7 (Data-LTH / EViT)",
    )
    drop: float | None = Field(None, ge=0, lt=1, description="fraction of patches dropped (keep = 1 - drop; with drop_at: at each location); set keep or drop")
    drop_at: list[int] | None = Field(
        None,
        description="hierarchical dropping: block indices (ascending, >= 1) before which tokens are dropped; the CLS attention "
        "of the block just before each location decides which patches continue (Data-LTH: [3, 6, 9] of 12). Unset: "
        "tickets chosen once at the input",
    )
    selection: Literal["attention", "random", "full"] = Field("attention", description="attention: top-K teacher CLS attention; random: K random patches per image and epoch; full: every patch (control)")
    blocks: Literal["last", "mean"] | list[int] = Field("last", description="input-level tickets: blocks whose CLS attention scores patches: last, mean (all blocks) or a list of indices (unused with drop_at: leave it at last)")
    sink: Literal["normalize", "exclude"] = Field("normalize", description="attention sink: normalize (LOTUS: prefix weight -> mean patch weight, renormalize per head) or exclude (Data-LTH: drop the prefix columns)")
    teacher: str | None = Field(
        None,
        description="who scores patches: a variant of this run (initial, dense, a finished stage name) or of teacher_run; "
        "self: the student's own CLS attention in its own forward (scoring online); default the model entering the stage",
    )
    teacher_run: str | None = Field(None, description="a finished run directory whose `teacher` variant scores patches (same patch grid); default this run")
    scoring: Literal["cached", "online"] = Field("cached", description="cached: score the training set once (no augmentation); online: the teacher scores each augmented batch")
    score_batch_size: int | None = Field(None, gt=0, description="batch size of the scoring pass; default the eval batch size")
    eval_tokens: Literal["all", "ticket"] = Field("all", description="all: evaluate on every patch; ticket: also on the teacher's tickets of the eval images (random tickets, fixed seed, for selection random)")
    show: int = Field(16, ge=0, description="training images in tickets.png (dropped patches greyed); 0: no figure")

    @model_validator(mode="after")
    def _keep_or_drop(self) -> "LotteryFinetune":
        if self.keep is not None and self.drop is not None:
            raise ValueError("set keep or drop, not both")
        if self.drop_at is None:
            if isinstance(self.keep, list):
                raise ValueError("keep: a list (one ratio per location) needs drop_at")
        else:
            at = self.drop_at
            if not at or any(b < 1 for b in at) or any(b >= c for b, c in zip(at, at[1:])):
                raise ValueError(f"drop_at must be a non-empty ascending list of block indices >= 1 (a block before each location scores), got {at}")
            if isinstance(self.keep, list) and len(self.keep) != len(at):
                raise ValueError(f"keep has {len(self.keep)} ratios for {len(at)} drop_at locations: give one per location or a single value")
            if self.blocks != "last":  # the default, written into every resolved recipe, is accepted and unused
                raise ValueError("blocks names the scoring blocks of input-level tickets; with drop_at the block before each location scores (remove blocks)")
            if self.selection == "full":
                raise ValueError("selection full drops nothing: remove drop_at")
        if self.teacher == "self" and self.scoring != "online":
            raise ValueError("teacher self scores with the student's live attention: set scoring online")
        if self.teacher_run is not None and self.teacher in (None, "self"):
            raise ValueError("teacher_run needs teacher: the variant of that run that scores (e.g. dense)")
        return self

    @property
    def keep_ratio(self) -> float:
        """Input-level tickets: the fraction of patches kept (1.0 for ``selection: full``).

        Raises:
            ValueError: the stage drops hierarchically (see :attr:`location_keeps`).
        """
        if self.drop_at is not None:
            raise ValueError("a hierarchical stage (drop_at) keeps a ratio per location: use location_keeps")
        if self.selection == "full":
            return 1.0
        if self.drop is not None:
            return 1.0 - self.drop
        return 0.9 if self.keep is None else float(self.keep)  # type: ignore[arg-type]

    @property
    def location_keeps(self) -> list[float]:
        """Hierarchical: the fraction of entering patches that continue at each ``drop_at`` location."""
        if self.drop_at is None:
            raise ValueError("location_keeps needs drop_at")
        if isinstance(self.keep, list):
            return [float(k) for k in self.keep]
        one = 1.0 - self.drop if self.drop is not None else (0.7 if self.keep is None else float(self.keep))
        return [one] * len(self.drop_at)


class SemiStructured(StageConfig):
    """2:4 structured sparsity on the block Linears (by default), combined with earlier masks."""

    makes_masks: ClassVar[bool] = True

    kind: Literal["semi_structured"] = "semi_structured"
    impl: ClassVar[str] = "lotus_deploy.stages.semi_structured"
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="layers to make 2:4 (scope grammar); ineligible ones are skipped and reported")
    permute: bool = Field(False, description="search an input-channel permutation per layer first (timm Mlp fc2, Attention proj) to keep more magnitude")
    permute_seconds: float = Field(2.0, gt=0, description="time budget of the permutation search per layer (s)")
    criterion: CriterionName = Field("magnitude", description="which 2 of every 4 stay: magnitude (|W|), wanda (|W| x input-channel norm) or sparsegpt (2:4 OBS with weight reconstruction); after any permutation")
    calibration_images: int = Field(CALIBRATION_IMAGES, gt=0, description=CALIBRATION_DOC)
    earlier_mask: Literal["within", "revive"] = Field(
        "within",
        description="within: the 2 of 4 are chosen among the weights an earlier mask kept (the layer ends sparser than 50 %); "
        "revive: chosen afresh among all weights of the layer (the earlier mask's zeros lose first, so it only decides "
        "groups with fewer than 2 survivors; revived weights start at 0 and train), the layer ends at exactly 50 %",
    )


def _check_granularity(criteria: list[str], granularity: str) -> None:
    if granularity == "per_row" and "sparsegpt" in criteria:
        raise ValueError("sparsegpt chooses its masks per column block of a layer: use granularity global or per_layer")


class Bake(StageConfig):
    """After bake the checkpoint is a plain timm state dict with zeros in it."""

    needs_masks: ClassVar[bool] = True
    ends_masks: ClassVar[bool] = True

    kind: Literal["bake"] = "bake"
    impl: ClassVar[str] = "lotus_deploy.stages.bake"


class Evaluate(StageConfig):
    kind: Literal["evaluate"] = "evaluate"
    impl: ClassVar[str] = "lotus_deploy.stages.evaluate"
    changes_model: ClassVar[bool] = False
    scope: Scope = Field(default_factory=lambda: list(DEFAULT_SCOPE), description="scope whose sparsity is reported")


class Export(StageConfig):
    """Uses the recipe's ``export`` section (opset, tolerance, images compared, ``precision``)."""

    kind: Literal["export"] = "export"
    impl: ClassVar[str] = "lotus_deploy.stages.export"
    changes_model: ClassVar[bool] = False


class Engine(StageConfig):
    """TensorRT build settings; the same fields drive ``lotus export RUN --trt``."""

    kind: Literal["engine"] = "engine"
    impl: ClassVar[str] = "lotus_deploy.stages.engine"
    changes_model: ClassVar[bool] = False
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field("fp16", description="what the engine computes in: built strongly typed from the ONNX converted to it (model.<precision>.onnx, made as `export.precision` makes it; needs the `precision` extra) on TensorRT 11, and for int8/fp8 or strongly_typed on 10; fp16/bf16 on TensorRT 10 use the builder flag on model.onnx")
    sparse: Literal["auto", "on", "off"] = Field("auto", description="SPARSE_WEIGHTS: auto = on when the model has 2:4 Linear weights")
    min_batch: int = Field(1, ge=1, description="optimization profile: smallest batch (images)")
    opt_batch: int = Field(8, ge=1, description="optimization profile: batch TensorRT tunes for (images)")
    max_batch: int = Field(32, ge=1, description="optimization profile: largest batch (images); the runtime splits larger ones")
    workspace_mib: int = Field(4096, ge=1, description="builder workspace memory pool limit (MiB)")
    timing_cache: Path | None = Field(None, description="timing cache file reused across builds; default: timing.cache in the engine folder")
    strongly_typed: bool = Field(False, description="TensorRT 10: build fp16/bf16 strongly typed from the converted ONNX instead of with the builder flag (TensorRT 11 always is; int8/fp8 always are)")
    accuracy: bool = Field(True, description="measure the engine's top-1 on the eval split and compare it with ONNX Runtime (CPU, fp32)")
    max_top1_drop: float | None = Field(1.0, ge=0, description="fail when the engine's top-1 is this many points below ONNX Runtime's (None: report only)")
    if_unavailable: Literal["fail", "skip"] = Field("fail", description="without TensorRT or a GPU (or the `precision` extra a converted ONNX needs): fail the run, or record the reason and go on (the ONNX and trtexec.sh are written when TensorRT is what is missing)")

    @model_validator(mode="after")
    def _batches(self) -> "Engine":
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}")
        return self

    def build_spec(self, out_dir: Path, sparse: bool):
        from lotus_deploy.export.trt import BuildSpec

        return BuildSpec(
            precision=self.precision, sparse=sparse, min_batch=self.min_batch, opt_batch=self.opt_batch,
            max_batch=self.max_batch, workspace_mib=self.workspace_mib,
            timing_cache=self.timing_cache or out_dir / "timing.cache", strongly_typed=self.strongly_typed,
        )


class Bench(StageConfig):
    """Uses the recipe's ``bench`` section (variants, backends, batch sizes, timing).

    Writes ``bench/results.json``, ``results.csv``, ``report.md``, ``pareto.png`` and
    ``sparsity.png`` in the run directory (see :mod:`lotus_deploy.bench`).
    """

    kind: Literal["bench"] = "bench"
    impl: ClassVar[str] = "lotus_deploy.stages.bench"
    changes_model: ClassVar[bool] = False



for _cls in (Finetune, MagnitudePrune, EssentialSparsity, InstantSoup, LotteryFinetune, SemiStructured, Bake, Evaluate, Export, Engine, Bench):
    STAGE_CONFIGS.add(_cls.model_fields["kind"].default, _cls)
del _cls
