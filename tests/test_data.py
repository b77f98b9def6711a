"""Data: seeded class-balanced subsets, digits, ImageFolder trees with bad images and mismatched classes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from lotus_deploy.data import CheckedImageFolder, balanced_subset, build_data
from lotus_deploy.errors import InputError
from lotus_deploy.models import InputSpec
from lotus_deploy.recipe.base import DataConfig

SPEC = InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def tree(root, classes=("a", "b"), n=3, test_classes=None):
    for split, cls in (("train", classes), ("test", test_classes or classes)):
        for c in cls:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (60 * i, 10, 200)).save(root / split / c / f"{i}.jpg")
    return root


@pytest.mark.parametrize("n,seed", [(10, 0), (13, 1), (40, 2)], ids=["even", "remainder", "more-than-some-classes-have"])
def test_balanced_subset_is_seeded_sorted_and_balanced(n, seed):
    targets = [i % 4 for i in range(40)] + [4] * 3  # class 4 has only 3 images
    a, b = balanced_subset(targets, n, seed), balanced_subset(targets, n, seed)
    assert a == b == sorted(a) and len(set(a)) == len(a)
    counts = Counter(targets[i] for i in a)
    per = n // 5
    assert all(counts[c] in (min(per, 3), min(per + 1, 3)) for c in [4]) and max(counts.values()) <= per + 1


def test_digits_bundle_and_eval_cache():
    d = build_data(DataConfig(kind="digits", train_subset=50, eval_subset=20), SPEC)
    assert len(d.train) == 50 and len(d.eval) == 20 and d.subsets["train"] is not None
    x, y = d.eval_batch(4)
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert d.bad_images() == []


def test_imagefolder_fails_on_a_corrupt_image_naming_it(tmp_path):
    root = tree(tmp_path)
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ds = CheckedImageFolder(str(root / "train"), bad_images="fail")
    with pytest.raises(InputError, match=f"{bad}: unreadable image"):
        ds[1]


def test_imagefolder_skip_serves_a_readable_image_of_the_same_class(tmp_path):
    root = tree(tmp_path)
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(b"garbage")
    ds = CheckedImageFolder(str(root / "train"), bad_images="skip")
    img, target = ds[1]
    assert target == 0 and img.size == (32, 32)
    assert ds.bad == {str(bad)}


def test_train_and_test_classes_must_match(tmp_path):
    root = tree(tmp_path, test_classes=("a", "c"))
    with pytest.raises(InputError, match="train and eval class folders differ"):
        build_data(DataConfig(kind="imagefolder", root=root), SPEC)


def test_every_data_kind_has_a_registered_builder_and_duplicates_are_refused():
    import typing

    from lotus_deploy.data import DATASETS, register_dataset

    kinds = typing.get_args(DataConfig.model_fields["kind"].annotation)
    assert set(kinds) == set(DATASETS)
    with pytest.raises(KeyError, match="already registered"):
        register_dataset("digits")(lambda cfg, train, tf: None)
