"""One factory for models: timm by name, with offline weights and tiny registered test models.

``build_model`` is the only place that creates a network. Offline weights go through timm's
``pretrained_cfg_overlay=dict(file=...)`` so timm's own filter resamples positional embeddings
and drops the pretrained head. The input size and normalization used by the data pipeline come
from the *built* model (:func:`input_spec`), never from the pretrained config, which may still
say 518 px for a model built at 112 px.
"""

from __future__ import annotations

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
    """Load a state dict from .safetensors or from .pth/.pt/.bin with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def build_model(cfg: ModelConfig, with_weights: bool = True) -> nn.Module:
    """Create the model described by ``cfg``.

    Args:
        cfg: the recipe's model section.
        with_weights: load ``cfg.weights`` / download pretrained weights; False builds the bare
            architecture (used when a run checkpoint is loaded right after).

    Raises:
        FileNotFoundError: ``cfg.weights`` does not exist.
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
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: no such file: {path}")
        # .pth goes through our weights_only loader; timm then filters/resamples it like any
        # pretrained checkpoint (state_dict overlay), .safetensors through timm's file loader.
        overlay = {"file": str(path)} if path.suffix == ".safetensors" else {"state_dict": read_state_dict(path)}
        return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
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
