"""The model factory: tiny registered models, the input spec from the built model, weight files
(head kept when it fits, a one-line report, clear errors for files that do not fit)."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lotus_deploy.errors import InputError
from lotus_deploy.models import (
    build_model,
    checkpoint_shapes,
    input_spec,
    read_state_dict,
)
from lotus_deploy.recipe.base import ModelConfig

VIT = dict(name="vit_tiny_patch16_224", img_size=32, kwargs={"depth": 1})


def save(model, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("name,size,patches", [("lotus_vit_micro_patch8_32", 32, 16), ("lotus_vit_tiny_patch8_32", 32, 16)])
def test_tiny_models_and_their_input_spec(name, size, patches):
    m = build_model(ModelConfig(name=name, num_classes=7))
    spec = input_spec(m)
    assert (spec.channels, spec.height, spec.width) == (3, size, size)
    assert m.patch_embed.num_patches == patches
    assert m(torch.zeros(2, 3, size, size)).shape == (2, 7)


def test_input_spec_comes_from_the_built_model_not_the_pretrained_cfg():
    m = build_model(ModelConfig(name="vit_tiny_patch16_224", num_classes=3, img_size=64, kwargs={"depth": 1}), with_weights=False)
    assert (input_spec(m).height, input_spec(m).width) == (64, 64)
    assert m.pretrained_cfg["input_size"][1] == 224


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_fine_tuned_head_of_the_right_shape_is_loaded(tmp_path, suffix):
    torch.manual_seed(0)
    src = build_model(ModelConfig(num_classes=10, **VIT), with_weights=False)
    path = save(src, tmp_path / f"ft{suffix}")
    lines = []
    m = build_model(ModelConfig(num_classes=10, weights=path, **VIT), log=lines.append)
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert len(lines) == 1 and "head loaded (shape fits)" in lines[0] and "0 missing" in lines[0]


def test_a_head_of_another_shape_is_new_and_reported(tmp_path):
    src = build_model(ModelConfig(num_classes=5, **VIT), with_weights=False)
    path = save(src, tmp_path / "w.safetensors")
    lines = []
    m = build_model(ModelConfig(num_classes=10, weights=path, **VIT), log=lines.append)
    assert m.head.weight.shape == (10, 192)
    assert "head new, random init (shape differs)" in lines[0] and "2 dropped" in lines[0]


def test_positional_embedding_is_resampled_and_reported(tmp_path):
    src = build_model(ModelConfig(num_classes=10, name="vit_tiny_patch16_224", img_size=64, kwargs={"depth": 1}), with_weights=False)
    path = save(src, tmp_path / "w.safetensors")
    lines = []
    build_model(ModelConfig(num_classes=10, weights=path, **VIT), log=lines.append)
    assert "1 resampled (pos_embed)" in lines[0]


def test_weights_of_another_architecture_fail_in_one_line(tmp_path):
    src = build_model(ModelConfig(num_classes=10, name="vit_small_patch16_224", img_size=32, kwargs={"depth": 1}), with_weights=False)
    path = save(src, tmp_path / "w.safetensors")
    with pytest.raises(InputError, match="does not fit vit_tiny_patch16_224: .*size mismatch") as e:
        build_model(ModelConfig(num_classes=10, weights=path, **VIT))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content,fragment", [
    (b"", "not a readable .pth checkpoint"),
    (pickle.dumps({"x": print}), "not a readable .pth checkpoint"),  # weights_only refuses arbitrary objects
    (pickle.dumps([1, 2]), "not a readable .pth checkpoint"),
], ids=["empty", "pickled-callable", "legacy-pickle"])
def test_unreadable_pth_files(tmp_path, content, fragment):
    p = tmp_path / "w.pth"
    p.write_bytes(content)
    with pytest.raises(InputError, match=fragment):
        read_state_dict(p)


def test_a_pth_that_is_not_a_state_dict(tmp_path):
    p = tmp_path / "w.pth"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(InputError, match="not a state dict"):
        read_state_dict(p)


def test_checkpoint_shapes_reads_the_header(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2, 3)}, str(p))
    assert checkpoint_shapes(p) == {"a": (2, 3)}
    p.write_bytes(b"\xff" * 40)
    with pytest.raises(InputError, match="not a readable .safetensors"):
        checkpoint_shapes(p)
