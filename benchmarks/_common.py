"""What the reference-benchmark scripts share: paths, the reference recipe head, logging, the results header.

The reference benchmark is described in ``../shared/REFERENCE.md``: real CIFAR-10 and the offline
DINOV2 ViT-S/14 weights. Scripts run as ``python benchmarks/<name>.py``, so this folder is on
``sys.path`` and they import ``_common`` directly.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"
DINOV2 = SHARED / "weights" / "vit_small_patch14_dinov2.safetensors"
MODEL = "vit_small_patch14_dinov2.lvd142m"


def log(msg: str) -> None:
    """One progress line on stderr (stdout stays free for results)."""
    print(msg, file=sys.stderr, flush=True)


def missing_shared() -> str | None:
    """Why the reference benchmark cannot run here, or None when the data and weights are present."""
    if CIFAR10.is_dir() and DINOV2.is_file():
        return None
    return f"needs {CIFAR10} and {DINOV2} (../shared); not found"


def reference_recipe(args, name: str) -> dict:
    """The reference recipe without stages: model at ``args.img_size`` px, seeded class-balanced subsets.

    Args:
        args: parsed arguments with ``seed``, ``device``, ``img_size``, ``batch``, ``train_subset``,
            ``eval_subset`` (None = all images) and ``workers``.
        name: the run's name.
    """
    return {
        "version": 1, "name": name, "seed": args.seed, "device": args.device,
        "model": {"name": MODEL, "weights": str(DINOV2), "img_size": args.img_size, "num_classes": 10},
        "data": {
            "kind": "cifar10", "root": str(CIFAR10), "batch_size": args.batch, "eval_batch_size": 128,
            "train_subset": args.train_subset, "eval_subset": args.eval_subset, "subset_seed": 0,
            "augment": "crop_flip", "workers": args.workers,
        },
    }


def results_header(script: str, argv: list[str] | None, weights: bool = True) -> dict:
    """Date (UTC), the command line, the environment and (``weights``) the weights' sha256 of a results file.

    ``weights=False`` for a script that only reads other results files (they carry the hash).
    """
    from lotus_deploy.files import sha256_file
    from lotus_deploy.run import environment

    head = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
    }
    if weights:
        head["weights_sha256"] = sha256_file(DINOV2)
    return head


def standard_error_line(eval_images: int, top1: float = 85.0) -> str:
    """The protocol line on noise: binomial standard error (points) of a top-1 near ``top1`` % on ``eval_images``."""
    se = 100 * (top1 / 100 * (1 - top1 / 100) / eval_images) ** 0.5
    return (f"Standard error of a top-1 near {top1:g}% on {eval_images:,} eval images is about {se:.1f} points "
            f"(one image = {100 / eval_images:.2f} point); differences below that are noise.")
