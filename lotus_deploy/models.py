"""One factory for models: timm by name, with offline weights and tiny registered test models.

``build_model`` is the only place that creates a network. Offline weights go through timm's
``pretrained_cfg_overlay=dict(file=...)`` so timm's own filter resamples positional embeddings
and drops the pretrained head. The input size and normalization used by the data pipeline come
from the *built* model (:func:`input_spec`), never from the pretrained config, which may still
say 518 px for a model built at 112 px.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from lotus_deploy.recipe.base import ModelConfig

_TINY_REGISTERED = False


def register_tiny_models() -> None:
    """Register lotus' tiny ViTs with timm (idempotent). Used by the demo and the tests.

    * ``lotus_vit_tiny_patch8_32``: 32 px, patch 8 (16 patches + CLS), width 64, 4 blocks, 4 heads,
      MLP 256 (the demo model: 96% on digits after 30 epochs, 40 s on 2 cores).
    * ``lotus_vit_micro_patch8_32``: 32 px, patch 8 (16 patches + CLS), width 32, 2 blocks, 2 heads,
      MLP 64 (unit tests).
    """
    global _TINY_REGISTERED
    if _TINY_REGISTERED:
        return
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def _make(defaults):
        def fn(pretrained: bool = False, **kwargs) -> VisionTransformer:
            if pretrained:
                raise ValueError("tiny lotus models have no pretrained weights")
            kwargs.pop("pretrained_cfg", None)
            kwargs.pop("pretrained_cfg_overlay", None)
            kwargs.pop("cache_dir", None)
            args = {**defaults, **kwargs}
            model = VisionTransformer(**args)
            model.default_cfg = model.pretrained_cfg = {
                "input_size": (3, args["img_size"], args["img_size"]),
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
                "num_classes": args.get("num_classes", 1000),
            }
            return model

        return fn

    tiny = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)
    micro = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    for name, defaults in (("lotus_vit_tiny_patch8_32", tiny), ("lotus_vit_micro_patch8_32", micro)):
        fn = _make(defaults)
        fn.__name__ = name
        fn.__module__ = __name__
        register_model(fn)
    _TINY_REGISTERED = True


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or from .pth/.pt/.bin with ``weights_only=True``.

    Raises:
        InputError: the file is unreadable, truncated, not a checkpoint, or holds objects a
            ``weights_only`` load refuses (a malicious pickle); the message names the file.
    """
    from lotus_deploy.errors import InputError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 — safetensors, pickle and zip errors have no common base
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable {path.suffix} checkpoint ({type(e).__name__}: {msg[:200]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: not a state dict (expected a mapping of tensor names to tensors)")
    return sd


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file (.safetensors: read from the header only)."""
    from lotus_deploy.errors import InputError

    path = Path(path)
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable .safetensors file ({msg[:200]})") from None


def _mismatch_summary(err: Exception) -> str:
    """One line out of torch's many-line load_state_dict error: counts and the first problem."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    sizes = [ln for ln in lines if "size mismatch" in ln]
    keys = [ln for ln in lines if "Missing key(s)" in ln or "Unexpected key(s)" in ln]
    first = (sizes or keys or lines or [type(err).__name__])[0][:200]
    counts = ([f"{len(sizes)} size mismatch(es)"] if sizes else []) + (["missing/unexpected keys"] if keys else [])
    return f"{', '.join(counts)}; first: {first}" if counts else first


def _load_weights(cfg: ModelConfig, kwargs: dict, log) -> nn.Module:
    """timm's pretrained path over a local file, then the head when its shape fits; logs what loaded.

    timm drops the classifier whenever ``num_classes`` differs from the pretrained config's,
    which would silently train a fine-tuned checkpoint's head from scratch: a head of the right
    shape in the file is loaded here. Positional embeddings of another size are resampled by timm.

    Raises:
        InputError: the file is unreadable or its weights do not fit the architecture.
    """
    import timm

    from lotus_deploy.errors import InputError

    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise InputError(f"model.weights: no such file: {path}")
    # .pth is read once, through our weights_only loader; timm then filters/resamples it like any
    # pretrained checkpoint (state_dict overlay). .safetensors goes through timm's file loader and
    # only its header is read here.
    sd = None if path.suffix == ".safetensors" else read_state_dict(path)
    shapes = checkpoint_shapes(path) if sd is None else {k: tuple(v.shape) for k, v in sd.items()}
    overlay = {"file": str(path)} if sd is None else {"state_dict": sd}
    try:
        model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise InputError(f"model.weights {path} does not fit {cfg.name}: {_mismatch_summary(e)}") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    clf = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    head_keys = [k for k in own if k == clf or k.startswith(clf + ".")]
    head_fits = bool(head_keys) and all(shapes.get(k) == own[k] for k in head_keys)
    if head_fits:
        if sd is None:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                sd = {k: f.get_tensor(k) for k in head_keys}
        with torch.no_grad():
            for k in head_keys:
                model.state_dict()[k].copy_(sd[k])
    loaded = [k for k in own if k in shapes and (shapes[k] == own[k]) and (k not in head_keys or head_fits)]
    resampled = [k for k in own if k in shapes and shapes[k] != own[k] and k not in head_keys]
    dropped = [k for k in shapes if k not in own or (k in head_keys and not head_fits)]
    missing = [k for k in own if k not in shapes and k not in head_keys]
    if log is not None:
        head = "loaded (shape fits)" if head_fits else ("new, random init (" + ("shape differs" if any(k in shapes for k in head_keys) else "not in the file") + ")")
        log(f"model.weights {path.name}: {len(loaded)} tensors loaded, {len(resampled)} resampled"
            f"{' (' + ', '.join(resampled[:3]) + ')' if resampled else ''}, {len(dropped)} dropped"
            f"{' (' + ', '.join(dropped[:3]) + ')' if dropped else ''}, {len(missing)} missing; head {head}")
    if len(missing) > 0 and len(loaded) < len(own) // 2:
        raise InputError(f"model.weights {path} does not fit {cfg.name}: {len(missing)} of its {len(own)} tensors are missing from the file (e.g. {', '.join(missing[:3])})")
    return model


def build_model(cfg: ModelConfig, with_weights: bool = True, log=None) -> nn.Module:
    """Create the model described by ``cfg``.

    Args:
        cfg: the recipe's model section.
        with_weights: load ``cfg.weights`` / download pretrained weights; False builds the bare
            architecture (used when a run checkpoint is loaded right after).
        log: ``fn(str)`` told which weight tensors were loaded, resampled, dropped or missing.

    Raises:
        InputError: ``cfg.weights`` is missing, unreadable or does not fit the architecture.
    """
    import timm

    register_tiny_models()
    kwargs = dict(cfg.kwargs)
    kwargs["num_classes"] = cfg.num_classes
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if not with_weights:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.weights is not None:
        return _load_weights(cfg, kwargs, log)
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: (C, H, W) in pixels and per-channel normalization."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {
            "input_size": [self.channels, self.height, self.width],
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def input_spec(model: nn.Module) -> InputSpec:
    """Input size from the built model (``patch_embed.img_size``), mean/std from its config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    if isinstance(size, int):
        size = (size, size)
    chans = getattr(getattr(pe, "proj", None), "in_channels", None) or cfg.get("input_size", (3,))[0]
    return InputSpec(
        channels=int(chans),
        height=int(size[0]),
        width=int(size[1]),
        mean=tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=str(cfg.get("interpolation", "bicubic")),
    )
