"""Shared fixtures: tiny models, tiny recipes on the bundled digits data, shared-data paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"
DINOV2 = SHARED / "weights" / "vit_small_patch14_dinov2.safetensors"

# A complete, fast recipe: micro ViT (2 blocks, width 32, 16 patches) on a digits subset.
TINY_RECIPE: dict = {
    "version": 1,
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "model": {"name": "lotus_vit_micro_patch8_32", "num_classes": 10},
    "data": {"kind": "digits", "batch_size": 32, "train_subset": 200, "eval_subset": 100, "augment": "none"},
    "train": {"backbone_lr_scale": 1.0, "grad_clip": 0, "label_smoothing": 0.0},  # from scratch: one lr, no clipping
    "stages": [
        {"kind": "finetune", "name": "train", "steps": 6, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.5},
        {"kind": "finetune", "name": "recover", "steps": 4, "lr": 5e-4},
        {"kind": "bake"},
    ],
    "bench": {"batch_sizes": [1, 4], "iters": 3, "warmup": 1},
}


@pytest.fixture
def tiny_recipe_dict() -> dict:
    """A fresh deep copy of :data:`TINY_RECIPE` to modify freely."""
    return copy.deepcopy(TINY_RECIPE)


@pytest.fixture
def tiny_recipe(tiny_recipe_dict):
    from lotus_deploy.recipe import parse_recipe

    return parse_recipe(tiny_recipe_dict)


@pytest.fixture
def micro_model():
    """lotus_vit_micro_patch8_32 with 10 classes, seeded, eval mode."""
    import torch

    from lotus_deploy.models import build_model
    from lotus_deploy.recipe.base import ModelConfig

    torch.manual_seed(0)
    return build_model(ModelConfig(name="lotus_vit_micro_patch8_32", num_classes=10)).eval()


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # One thread: the tiny models gain nothing from more, and on a shared 2-core machine a
    # second OpenMP thread can make every step 10-100x slower. Subprocesses get the same via
    # OMP_NUM_THREADS (see ``subprocess_env``), so results match in-process runs bit for bit.
    import torch

    torch.set_num_threads(1)


def subprocess_env() -> dict:
    """Environment for ``python -m lotus_deploy.cli`` subprocesses in tests (1 thread, repo on path)."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run of :data:`TINY_RECIPE` plus ``export`` (shared, read-only for tests)."""
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"].append({"kind": "export"})
    return compress(parse_recipe(raw), out=tmp_path_factory.mktemp("runs") / "tiny", quiet=True)


needs_cifar_and_weights = pytest.mark.skipif(
    not (CIFAR10.is_dir() and DINOV2.is_file()),
    reason=f"real-data test: needs {CIFAR10} and {DINOV2} (the project's ../shared folder), absent here",
)
