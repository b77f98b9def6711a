"""Checks of a recipe's inputs before anything is written (``lotus validate`` and ``compress``).

Pure Python and fast: no torch import (``lotus validate`` stays instant). Each problem names
the recipe field and the file: the weights file exists, is readable and has a valid header; the
data root exists with matching train/test class folders that fit ``num_classes``; the input size
is a multiple of the patch size; the packages the export settings need (``export.dynamo``,
``export.precision``, an ``engine`` stage's precision) are installed.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

from lotus_deploy.recipe import Problem, RecipeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_SAFETENSORS_MAX_HEADER = 100 << 20


def weights_problem(path: Path) -> str | None:
    """Why a weights file cannot be read (missing, unreadable, bad header), or None.

    ``.safetensors``: the 8-byte header length and the JSON header are parsed and every tensor's
    byte range checked against the file size. ``.pth``/``.pt``/``.bin``: a zip archive (torch's
    format since 1.6) or a pickle stream; its content is checked when it is loaded.
    """
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix == ".safetensors":
                if len(head) < 8:
                    return f"{path}: truncated .safetensors file ({size} bytes)"
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _SAFETENSORS_MAX_HEADER):
                    return f"{path}: not a .safetensors file (header length {n} does not fit its {size} bytes)"
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return f"{path}: not a .safetensors file (garbage header)"
                if not isinstance(header, dict):
                    return f"{path}: not a .safetensors file (header is not a mapping)"
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
                if 8 + n + end > size:
                    return f"{path}: truncated .safetensors file ({size} bytes, its header needs {8 + n + end})"
                return None
    except PermissionError:
        return f"{path}: not readable (permission denied)"
    except (OSError, struct.error, KeyError, TypeError, IndexError) as e:
        return f"{path}: unreadable ({e})"
    if size == 0:
        return f"{path}: empty file"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    return f"{path}: a zip archive but not a torch checkpoint (no data.pkl)"
        except zipfile.BadZipFile as e:
            return f"{path}: damaged zip archive ({e})"
        return None
    if head[:1] != b"\x80":
        return f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)"
    return None


def _classes(split: Path) -> list[str]:
    return sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def data_problems(cfg, num_classes: int) -> list[Problem]:
    """Problems with ``data``: root and split folders, class folders, images, ``num_classes``."""
    out: list[Problem] = []
    if cfg.kind == "digits":
        if num_classes < 10:
            out.append(Problem("model.num_classes", f"digits has 10 classes; num_classes {num_classes} is smaller"))
        return out
    if cfg.root is None:
        return out  # cross_check reports the missing root
    root = Path(cfg.root).expanduser()
    if cfg.kind == "cifar10" and cfg.download:
        return out  # torchvision downloads into root
    if not root.is_dir():
        return [Problem("data.root", f"no such folder: {root}")]
    train = root / "train"
    evals = [root / n for n in ("test", "val") if (root / n).is_dir()]
    if cfg.kind == "cifar10" and not train.is_dir() and any((root / n).exists() for n in ("cifar-10-batches-py",)):
        return out  # torchvision's own layout
    if not train.is_dir() or not evals:
        return [Problem("data.root", f"{root} needs train/ and test/ (or val/) class folders")]
    tr, ev = _classes(train), _classes(evals[0])
    if not tr:
        return [Problem("data.root", f"{train} has no class folders")]
    if tr != ev:
        only = sorted(set(tr) ^ set(ev))
        out.append(Problem("data.root", f"{train} and {evals[0]} have different class folders (e.g. {', '.join(only[:3])}); labels would not match"))
    if len(tr) > num_classes:
        out.append(Problem("model.num_classes", f"{num_classes} is smaller than the {len(tr)} class folders in {train}"))
    empty = [c for c in tr if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in (train / c).iterdir())]
    if empty:
        out.append(Problem("data.root", f"class folder(s) with no images in {train}: {', '.join(empty[:3])}"))
    return out


def size_problem(model_cfg) -> Problem | None:
    """The input size must be a multiple of the patch size (from kwargs or the model name)."""
    patch = model_cfg.kwargs.get("patch_size")
    if patch is None:
        m = re.search(r"patch(\d+)", model_cfg.name)
        patch = int(m.group(1)) if m else None
    size = model_cfg.img_size or model_cfg.kwargs.get("img_size")
    if isinstance(patch, int) and isinstance(size, int) and size % patch:
        return Problem("model.img_size", f"{size} px is not a multiple of the patch size {patch} px (try {size - size % patch} or {size - size % patch + patch})")
    return None


def input_problems(recipe) -> list[Problem]:
    """Every problem with the recipe's files and sizes (empty when all inputs look usable)."""
    out: list[Problem] = []
    if recipe.model.weights is not None:
        why = weights_problem(Path(recipe.model.weights).expanduser())
        if why:
            out.append(Problem("model.weights", why))
    out += data_problems(recipe.data, recipe.model.num_classes)
    p = size_problem(recipe.model)
    if p:
        out.append(p)
    from lotus_deploy.export.extras import recipe_problems

    out += [Problem(field, why) for field, why in recipe_problems(recipe)]  # exporter / precision packages
    return out


RESAMPLED = ("pos_embed", "patch_embed.proj.weight")  # timm resamples these to the model's size


def weights_fit_problem(model_cfg) -> str | None:
    """Why the weights file cannot load into the recipe's architecture, or None (imports torch).

    Reads the file the way the model factory will (``.pth`` with ``weights_only``) and compares
    tensor shapes name by name with the bare model; positional embeddings and the patch
    projection are resampled by timm and the classifier head may differ.
    """
    from lotus_deploy.errors import InputError
    from lotus_deploy.models import build_model, checkpoint_shapes

    path = Path(model_cfg.weights).expanduser()
    try:
        shapes = checkpoint_shapes(path)
    except InputError as e:
        return str(e)
    model = build_model(model_cfg, with_weights=False)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head") + "."
    bad = [k for k in own if k in shapes and shapes[k] != own[k] and not k.endswith(RESAMPLED) and not k.startswith(head)]
    if bad:
        k = bad[0]
        return f"{path}: {len(bad)} tensor(s) do not fit {model_cfg.name} (e.g. {k}: file {shapes[k]} vs model {own[k]})"
    return None


def check_inputs(recipe, source: str = "recipe", deep: bool = False) -> None:
    """Raise :class:`RecipeError` (exit 2, one line a problem) when an input is unusable.

    Args:
        deep: also load the weights file's tensor list and compare shapes with the architecture
            (imports torch and timm; ``lotus compress`` does this before writing anything).
    """
    problems = input_problems(recipe)
    if deep and not problems and recipe.model.weights is not None:
        why = weights_fit_problem(recipe.model)
        if why:
            problems.append(Problem("model.weights", why))
    if problems:
        raise RecipeError(source, problems)
