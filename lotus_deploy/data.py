"""Datasets, class-balanced seeded subsets, transforms and loaders.

Every image goes through one pipeline: (training only: pad-and-crop at the source resolution,
horizontal flip) -> resize to the *model's* input size (bicubic) -> tensor -> the model's
mean/std. The eval split can be decoded, resized and normalized once and kept in memory
(``cache_eval``) so repeated evaluations (sweeps, per-epoch eval, benchmarks) are not bound by
JPEG decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    SequentialSampler,
    Subset,
    TensorDataset,
)
from torchvision.datasets import ImageFolder

from lotus_deploy import distributed as dist
from lotus_deploy.errors import InputError, RunError
from lotus_deploy.models import InputSpec
from lotus_deploy.progress import bar
from lotus_deploy.recipe.base import DataConfig
from lotus_deploy.registry import Registry

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (8x8, 1,797 images) as RGB PIL images.

    The split is fixed: a stratified 75/25 train/test split with seed 0.
    """

    def __init__(self, train: bool, transform=None):
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        idx = np.arange(len(d.target))
        tr, te = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=0)
        keep = tr if train else te
        self.images = (d.images[keep] * (255.0 / 16.0)).round().astype("uint8")  # (N, 8, 8)
        self.targets = [int(t) for t in d.target[keep]]
        self.classes = [str(i) for i in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.images[i], mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class _PadCrop:
    """RandomCrop at the image's own size after zero padding of 1/8 of its side.

    CIFAR-style (32 px -> padding 4) at any source resolution (8 px digits -> padding 1).
    """

    def __call__(self, img):
        from torchvision.transforms import RandomCrop

        w, h = img.size
        return RandomCrop((h, w), padding=max(1, round(min(w, h) / 8)))(img)


def build_transform(spec: InputSpec, train: bool, augment: str = "none"):
    """The torchvision transform for one split, sized and normalized for the model."""
    from torchvision import transforms as T

    ops = []
    if train and augment in ("crop", "crop_flip"):
        ops.append(_PadCrop())
    if train and augment == "crop_flip":
        ops.append(T.RandomHorizontalFlip())
    interp = getattr(T.InterpolationMode, spec.interpolation.upper(), T.InterpolationMode.BICUBIC)
    ops += [T.Resize((spec.height, spec.width), interpolation=interp), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


DATASETS: Registry[Callable[[DataConfig, bool, Any], Dataset]] = Registry("dataset kind")
"""``data.kind`` -> ``fn(cfg, train, transform)`` building the full train or eval split."""


def register_dataset(kind: str):
    """Register a split builder for ``data.kind`` (duplicates refused)."""
    return lambda fn: DATASETS.add(kind, fn)


def split_dataset(cfg: DataConfig, train: bool, transform) -> Dataset:
    """The full train or eval split (before subsetting) with ``targets`` and ``classes``."""
    return DATASETS[cfg.kind](cfg, train, transform)


@register_dataset("digits")
def _digits(cfg: DataConfig, train: bool, transform) -> Dataset:
    return DigitsDataset(train, transform)


def _image_folder(root: Path, cfg: DataConfig, train: bool, transform) -> Dataset:
    names = ["train"] if train else ["test", "val"]
    for n in names:
        if (root / n).is_dir():
            return CheckedImageFolder(str(root / n), transform=transform, bad_images=cfg.bad_images)
    raise InputError(f"data.root {root} has no {' or '.join(n + '/' for n in names)} folder")


@register_dataset("imagefolder")
def _imagefolder(cfg: DataConfig, train: bool, transform) -> Dataset:
    if cfg.root is None:
        raise InputError(f"data.root is required for data.kind={cfg.kind}")
    return _image_folder(Path(cfg.root).expanduser(), cfg, train, transform)


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig, train: bool, transform) -> Dataset:
    """An ImageFolder ``train/``/``test/`` tree under root, else torchvision's CIFAR10 (may download)."""
    from torchvision.datasets import CIFAR10

    if cfg.root is None:
        raise InputError(f"data.root is required for data.kind={cfg.kind}")
    root = Path(cfg.root).expanduser()
    if (root / "train").is_dir():
        return _image_folder(root, cfg, train, transform)
    return CIFAR10(str(root), train=train, transform=transform, download=cfg.download)


class CheckedImageFolder(ImageFolder):
    """torchvision's ImageFolder whose unreadable images fail with their path, or are replaced.

    ``bad_images: fail`` raises :class:`InputError` naming the file; ``skip`` serves the next
    readable image of the same class in its place (deterministic) and counts the file in
    :attr:`bad` (per process: with ``workers`` > 0 each worker counts its own).
    """

    def __init__(self, root: str, transform=None, bad_images: str = "fail"):
        super().__init__(root, transform=transform)
        self.bad_images = bad_images
        self.bad: set[str] = set()

    def __getitem__(self, index: int):
        for j in self._same_class(index):
            path, target = self.samples[j]
            try:
                img = self.loader(path)
            except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors
                if self.bad_images == "fail":
                    raise InputError(f"{path}: unreadable image ({type(e).__name__}: {e}); fix or remove it, or set data.bad_images: skip") from None
                self.bad.add(path)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise InputError(f"{self.samples[index][0]}: unreadable image and no readable image of its class to use instead")

    def _same_class(self, index: int):
        """``index``, then the other indices of its class in file order (wrapping around)."""
        yield index
        n, target = len(self.samples), self.targets[index]
        for k in range(1, n):
            j = (index + k) % n
            if self.targets[j] == target:
                yield j


def balanced_subset(targets: list[int], n: int, seed: int) -> list[int]:
    """Seeded class-balanced subset: ``n // classes`` per class (remainder to the first classes).

    Returns sorted indices into ``targets``. Classes with too few images give all they have.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(targets)
    classes = sorted(set(targets))
    per, extra = divmod(n, len(classes))
    out: list[int] = []
    for j, c in enumerate(classes):
        idx = torch.nonzero(t == c).flatten()
        take = per + (1 if j < extra else 0)
        out += idx[torch.randperm(len(idx), generator=g)[:take]].tolist()
    return sorted(out)


def shuffled_loader(dataset: Dataset, seed: int, batch_size: int, epoch: int = 0, workers: int = 0, drop_last: bool = False) -> DataLoader:
    """Shuffled loader of ``dataset`` whose order depends only on ``seed + epoch``; the one training loader.

    In a distributed run each rank gets its share of every global batch: a DistributedSampler
    (seeded with ``seed``, ``set_epoch(epoch)``: the same permutation as one process draws for
    ``seed + epoch``, each rank taking every world-size-th image, the last few repeated so that
    every rank runs the same number of steps) and ``batch_size / world size`` images per rank, so
    a recipe's batch size is the global one at any world size. Pinned memory when a GPU is present.

    Args:
        batch_size: images per step (the global batch in a distributed run).

    Raises:
        RunError: the batch size is not divisible by the world size.
    """
    common = {"num_workers": workers, "drop_last": drop_last, "persistent_workers": False, "pin_memory": _pin_memory()}
    g = torch.Generator().manual_seed(seed + epoch)
    if not dist.active():
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, **common)
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=per_rank_batch(batch_size), sampler=sampler, generator=g, **common)


@dataclass
class DataBundle:
    """The train and eval splits of a recipe, subset and transformed for one model."""

    cfg: DataConfig
    spec: InputSpec
    train: Dataset
    eval: Dataset
    classes: list[str]
    subsets: dict[str, list[int] | None] = field(default_factory=dict)
    _eval_cache: TensorDataset | None = None

    def train_loader(self, seed: int, batch_size: int | None = None, drop_last: bool = False, epoch: int = 0) -> DataLoader:
        """Shuffled training loader whose order depends only on ``seed + epoch``.

        In a distributed run each rank gets its share of every global batch: a DistributedSampler
        (seeded with ``seed``, ``set_epoch(epoch)``: the same permutation of the split as one
        process draws for ``seed + epoch``, each rank taking every world-size-th image, the last
        few repeated so that every rank runs the same number of steps) and ``batch_size / world
        size`` images per rank, so a recipe's batch size is the global one at any world size.

        Raises:
            RunError: the batch size is not divisible by the world size.
        """
        return shuffled_loader(self.train, seed, batch_size or self.cfg.batch_size, epoch, self.cfg.workers, drop_last)

    def eval_dataset(self) -> Dataset:
        """The eval split; decoded tensors held in memory when ``cache_eval``."""
        if not self.cfg.cache_eval:
            return self.eval
        if self._eval_cache is None:
            loader = DataLoader(self.eval, batch_size=256, num_workers=self.cfg.workers)
            xs, ys = [], []
            for x, y in bar(loader, desc="decode eval", unit="batch"):
                xs.append(x)
                ys.append(y)
            self._eval_cache = TensorDataset(torch.cat(xs), torch.cat(ys))
        return self._eval_cache

    def eval_loader(self, batch_size: int | None = None) -> DataLoader:
        bs = batch_size or self.cfg.eval_batch_size or self.cfg.batch_size
        ds = self.eval_dataset()
        # its own generator: iterating a loader without one draws a seed from the global torch RNG,
        # and evaluating would change the random crops/flips of the training that follows
        return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=0 if ds is self._eval_cache else self.cfg.workers,
                          generator=torch.Generator().manual_seed(0), pin_memory=_pin_memory())

    def bad_images(self) -> list[str]:
        """Unreadable images replaced so far in this process (``bad_images: skip``)."""
        out: set[str] = set()
        for ds in (self.train, self.eval):
            base = ds.dataset if isinstance(ds, Subset) else ds
            out |= getattr(base, "bad", set())
        return sorted(out)

    def eval_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` eval images and labels as one batch (for parity checks)."""
        ds = self.eval_dataset()
        n = min(n, len(ds))
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.as_tensor(ys)


def _pin_memory() -> bool:
    """Page-locked batches when a GPU is there to copy them to (faster, asynchronous host-to-device copies)."""
    return torch.cuda.is_available()


def per_rank_batch(batch_size: int) -> int:
    """Images per rank of a global batch of ``batch_size`` (the batch size in a one-process run).

    Raises:
        RunError: ``batch_size`` is not divisible by the world size.
    """
    n = dist.world_size()
    if batch_size % n:
        raise RunError(f"batch size {batch_size} is not divisible by the world size {n}: "
                       f"set data.batch_size (and any stage's batch_size) to a multiple of {n}")
    return batch_size // n


def shard_eval_loader(loader) -> DataLoader | None:
    """This rank's share of an in-order DataLoader: images ``rank, rank + world, ...``, no padding.

    Every image of the split is in exactly one rank's share (unlike DistributedSampler, which
    repeats images to even the shares out). Returns None for anything but an unshuffled
    DataLoader (lists, generators, shuffled loaders): those stay whole on every rank.
    """
    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, SequentialSampler) or loader.batch_size is None:
        return None
    ds = loader.dataset
    return DataLoader(
        Subset(ds, list(dist.shard_indices(len(ds)))), batch_size=loader.batch_size, shuffle=False,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        generator=loader.generator,
    )


def build_data(cfg: DataConfig, spec: InputSpec) -> DataBundle:
    """Build the recipe's data for a model with input ``spec``.

    Raises:
        FileNotFoundError / RuntimeError: dataset missing (torchvision's message says how to
            download).
    """
    train_full = split_dataset(cfg, True, build_transform(spec, True, cfg.augment))
    eval_full = split_dataset(cfg, False, build_transform(spec, False))
    subsets: dict[str, list[int] | None] = {"train": None, "eval": None}
    train, ev = train_full, eval_full
    if cfg.train_subset is not None and cfg.train_subset < len(train_full):
        subsets["train"] = balanced_subset(list(train_full.targets), cfg.train_subset, cfg.subset_seed)
        train = Subset(train_full, subsets["train"])
    if cfg.eval_subset is not None and cfg.eval_subset < len(eval_full):
        subsets["eval"] = balanced_subset(list(eval_full.targets), cfg.eval_subset, cfg.subset_seed + 1)
        ev = Subset(eval_full, subsets["eval"])
    classes = list(getattr(train_full, "classes", [])) or CIFAR10_CLASSES
    eval_classes = list(getattr(eval_full, "classes", [])) or CIFAR10_CLASSES
    if classes != eval_classes:
        raise InputError(f"data.root {cfg.root}: train and eval class folders differ ({len(classes)} vs {len(eval_classes)}; "
                         f"e.g. {', '.join(sorted(set(classes) ^ set(eval_classes))[:3])}): labels would not match")
    return DataBundle(cfg=cfg, spec=spec, train=train, eval=ev, classes=classes, subsets=subsets)
