"""2:4 structured sparsity: pure functions for masks, compliance checks and eligibility.

NVIDIA sparse tensor cores (Ampere and newer) run a GEMM with a weight that has at most 2
non-zeros in every group of 4 consecutive values along the *reduction* axis K. For an
``nn.Linear`` weight ``[out_features, in_features]`` (``y = x @ W.T``) that is dim 1; for a
``Conv2d`` weight ``[O, I, kh, kw]`` it is dim 1 as well (input channels at each tap).

Everything here is pure: masks are returned, never applied (see :func:`lotus_deploy.masks.apply_masks_`).
"""

from __future__ import annotations

from typing import Any

import torch

N_KEEP, GROUP = 2, 4
"""At most ``N_KEEP`` non-zeros in each group of ``GROUP`` consecutive weights along K."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Weight dtypes that sparse float kernels (TensorRT, CUTLASS) accept."""

SMALL_CHANNELS = 256
"""Layers with fewer input or output channels rarely run faster with 2:4 kernels (reported, not skipped)."""


def _groups(t: Any, axis: int):
    """``t`` (torch or numpy) with ``axis`` moved last, split into groups of 4: ``(rest, K/4, 4)``.

    None when the axis length K is not a multiple of 4.
    """
    axis = axis % t.ndim
    k = t.shape[axis]
    if k % GROUP:
        return None
    if isinstance(t, torch.Tensor):
        return t.detach().movedim(axis, -1).reshape(-1, k // GROUP, GROUP)
    import numpy as np

    return np.moveaxis(np.asarray(t), axis, -1).reshape(-1, k // GROUP, GROUP)


def two_four_masks(weight: torch.Tensor, existing: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the 2 largest |w| in each group of 4 along ``in_features`` (dim 1), among survivors.

    Args:
        weight: ``(out_features, in_features)`` Linear weight; ``in_features % 4 == 0``.
        existing: optional boolean mask of the same shape (True = keep) already in force. The 2:4
            choice is made among the weights it keeps, and the result keeps nothing it removes,
            so the returned mask satisfies both (``result <= existing``).

    Returns:
        Boolean mask (True = keep), 2:4 along dim 1. Ties keep the lower index.

    Raises:
        ValueError: not 2-D, or ``in_features`` not a multiple of 4.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if in_f % GROUP:
        raise ValueError(f"in_features {in_f} is not a multiple of {GROUP}")
    score = weight.detach().abs().float()
    if existing is not None:
        if existing.shape != weight.shape:
            raise ValueError(f"existing mask shape {tuple(existing.shape)} != weight shape {tuple(weight.shape)}")
        existing = existing.to(device=score.device, dtype=torch.bool)
        score = torch.where(existing, score, torch.full_like(score, -1.0))  # removed weights rank last
    g = score.view(out_f, in_f // GROUP, GROUP)  # (out, K/4, 4)
    top = torch.argsort(g, dim=-1, descending=True, stable=True)[..., :N_KEEP]  # (out, K/4, 2)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True).view(out_f, in_f)
    return keep & existing if existing is not None else keep


def two_four_violations(tensor: Any, axis: int) -> int | None:
    """Number of groups of 4 along ``axis`` with more than 2 non-zeros.

    Args:
        tensor: torch tensor or numpy array of any rank.
        axis: the reduction axis (groups are consecutive along it, at every other index).

    Returns:
        0 for a 2:4 tensor; None when the axis length is not a multiple of 4 (the pattern is
        undefined there, so such a tensor is never 2:4).
    """
    g = _groups(tensor, axis)
    if g is None:
        return None
    return int(((g != 0).sum(-1) > N_KEEP).sum())


def is_two_four(tensor: Any, axis: int) -> bool:
    """True when every group of 4 consecutive values along ``axis`` has at most 2 non-zeros."""
    return two_four_violations(tensor, axis) == 0


def two_four_groups(tensor: Any, axis: int) -> int:
    """How many groups of 4 lie along ``axis`` (0 when its length is not a multiple of 4)."""
    k = tensor.shape[axis % tensor.ndim]
    size = tensor.numel() if isinstance(tensor, torch.Tensor) else tensor.size
    return 0 if k % GROUP else size // GROUP


def eligible(module: torch.nn.Module) -> str | None:
    """Why ``module`` cannot be made 2:4 for sparse GEMM kernels, or None when it can.

    Follows the sparse-kernel constraints of TensorRT / CUTLASS: an ``nn.Linear`` with a float
    weight (fp32, fp16 or bf16), ``in_features`` (K) a multiple of 16 and ``out_features`` a
    multiple of 8.
    """
    import torch.nn as nn

    if not isinstance(module, nn.Linear):
        return f"not an nn.Linear ({type(module).__name__})"
    w = module.weight
    if w.dtype not in FLOAT_DTYPES:
        return f"weight dtype {str(w.dtype).replace('torch.', '')} is not float32/float16/bfloat16"
    if module.in_features % 16:
        return f"in_features {module.in_features} is not a multiple of 16"
    if module.out_features % 8:
        return f"out_features {module.out_features} is not a multiple of 8"
    return None


def is_small(module: torch.nn.Module) -> bool:
    """True when a Linear has fewer than :data:`SMALL_CHANNELS` input or output channels."""
    return min(module.in_features, module.out_features) < SMALL_CHANNELS


def kept_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the total |w| that ``mask`` keeps, in [0, 1] (1.0 for an all-zero weight)."""
    a = weight.detach().abs().double()
    total = float(a.sum())
    return 1.0 if total == 0 else float((a * mask.to(a.device, torch.bool)).sum()) / total


def two_four_kept(magnitude: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the 2 largest values in each group of 4 along dim 1: ``(K/4,)`` per group.

    ``magnitude`` is ``|W|`` (times any mask in force), shape ``(out, in)``.
    """
    out_f, in_f = magnitude.shape
    g = magnitude.reshape(out_f, in_f // GROUP, GROUP)
    return g.topk(N_KEEP, dim=-1).values.sum(-1).sum(0)


__all__ = [
    "N_KEEP", "GROUP", "FLOAT_DTYPES", "SMALL_CHANNELS", "two_four_masks", "two_four_violations", "is_two_four",
    "two_four_groups", "eligible", "is_small", "kept_magnitude", "two_four_kept",
]


def two_four_layers(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the eligible Linears (:func:`eligible`) whose weight, times its mask in ``masks``
    when given, is 2:4 along ``in_features`` (K): the layers a sparse GEMM kernel can use. Pure."""
    import torch.nn as nn

    masks = masks or {}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and eligible(mod) is None:
            w = mod.weight.detach()
            m = masks.get(f"{name}.weight")
            if m is not None:
                w = w * m.to(w.device, w.dtype)
            if is_two_four(w, axis=1):
                out.append(name)
    return out
