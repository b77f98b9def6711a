"""Real data: CIFAR-10 (ImageFolder copy) + the shared DINOv2 ViT-S/14 weights, at 56 px.

Skipped with the reason when ``../shared/data/cifar10`` or the weights file is absent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CIFAR10, DINOV2, needs_cifar_and_weights

pytestmark = [pytest.mark.slow, needs_cifar_and_weights]

IMG = 56  # 4 x 4 patches of 14 px + CLS


def real_recipe(**stage_overrides) -> dict:
    return {
        "version": 1,
        "name": "real56",
        "seed": 0,
        "device": "cpu",
        "model": {"name": "vit_small_patch14_dinov2.lvd142m", "weights": str(DINOV2), "img_size": IMG, "num_classes": 10},
        "data": {"kind": "cifar10", "root": str(CIFAR10), "batch_size": 50, "train_subset": 200, "eval_subset": 100,
                 "augment": "none"},
        "stages": [
            {"kind": "finetune", "name": "head", "train": "head", "epochs": 4, "lr": 1e-2, "weight_decay": 0.0,
             "warmup": 0, "schedule": "constant", "eval_every_epoch": False, **stage_overrides},
            {"kind": "evaluate"},
        ],
    }


def test_weights_load_with_resampled_position_embedding():
    from safetensors import safe_open

    from lotus_deploy.models import build_model, input_spec
    from lotus_deploy.recipe import parse_recipe

    recipe = parse_recipe(real_recipe())
    model = build_model(recipe.model)
    n = (IMG // 14) ** 2
    assert model.pos_embed.shape == (1, 1 + n, 384)
    spec = input_spec(model)
    assert (spec.channels, spec.height, spec.width) == (3, IMG, IMG)  # the built size, not the checkpoint's 518 px
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406), abs=1e-3)
    with safe_open(str(DINOV2), "pt") as f:
        assert f.get_slice("pos_embed").get_shape()[1] == 1 + 37 * 37  # what was resampled
        pe = f.get_tensor("pos_embed")
        for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "cls_token"):
            assert torch.equal(dict(model.named_parameters())[name].detach(), f.get_tensor(name)), name
    assert torch.allclose(model.pos_embed[0, 0], pe[0, 0])  # the CLS position is kept as is
    assert model.head.weight.shape == (10, 384)
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, IMG, IMG)).shape == (2, 10)


def test_head_only_finetune_beats_chance(tmp_path):
    from lotus_deploy.files import read_json
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    run = compress(parse_recipe(real_recipe()), out=tmp_path / "run", quiet=True)
    m = read_json(run / "manifest.json")
    head, ev = m["stages"]
    assert ev["metrics"]["images"] == 100
    print(f"real data: head-only top-1 {ev['metrics']['top1']:.1f}% on 100 CIFAR-10 test images at {IMG} px")
    assert ev["metrics"]["top1"] >= 25.0, ev["metrics"]  # chance is 10%; measured 36% here
    assert ev["metrics"]["top1"] == pytest.approx(head["metrics"]["top1"])
    sub = read_json(run / "subsets.json")
    assert len(sub["train"]) == 200 and len(sub["eval"]) == 100
    # head-only: the backbone in the checkpoint is the pretrained one
    from lotus_deploy.files import load_tensors

    sd = load_tensors(run / head["artifacts"]["model"]["path"])
    init = load_tensors(run / m["initial"]["artifacts"]["model"]["path"])
    changed = {k for k in sd if not torch.equal(sd[k], init[k])}
    assert changed == {"head.weight", "head.bias"}
