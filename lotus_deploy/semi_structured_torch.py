"""PyTorch 2:4 backend for GPUs without TensorRT: ``torch.sparse.to_sparse_semi_structured``.

The eligible Linear weights of a baked 2:4 model become ``SparseSemiStructuredTensor``s (values
plus metadata), so ``F.linear`` runs on the sparse tensor cores through cuSPARSELt (or CUTLASS
when cuSPARSELt is absent). Requirements: CUDA, compute capability >= 8.0 (Ampere or newer),
fp16 or bf16 weights, and shapes that are multiples of the backend's minimum tile.

A weight is converted only when it already *is* 2:4 along ``in_features`` (the reduction axis):
the conversion would otherwise silently prune it. Every other Linear in scope is skipped with its
reason (modelopt style: reported, never a crash).

UNTESTED HERE (no GPU on the development machines): the conversion itself runs only on CUDA; its
tests are marked ``gpu`` and skipped with the reason from :func:`unavailable_reason`. The pure
per-layer checks (:func:`layer_reason`) are tested on the CPU.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from lotus_deploy.scope import DEFAULT_SCOPE

MIN_CAPABILITY = (8, 0)
DTYPES = (torch.float16, torch.bfloat16)


class SemiStructuredUnavailable(RuntimeError):
    """This machine cannot run semi-structured sparse kernels (the message says why)."""


def backend_class(name: str | None = None):
    """The ``SparseSemiStructuredTensor`` subclass to use: cuSPARSELt when present, else CUTLASS."""
    name = name or ("cusparselt" if torch.backends.cusparselt.is_available() else "cutlass")
    if name == "cusparselt":
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if name == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    raise ValueError(f"backend must be cusparselt or cutlass, got {name!r}")


def unavailable_reason(dtype: torch.dtype = torch.float16) -> str | None:
    """None when semi-structured 2:4 matmuls can run here in ``dtype``, else why not (one line)."""
    if dtype not in DTYPES:
        return f"2:4 semi-structured weights need float16 or bfloat16, got {str(dtype).replace('torch.', '')}"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch: to_sparse_semi_structured needs an NVIDIA GPU with compute capability >= 8.0 (Ampere or newer)"
    cc = torch.cuda.get_device_capability()
    if cc < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} has compute capability {cc[0]}.{cc[1]}; 2:4 sparse tensor cores need >= 8.0"
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name()} does not support bfloat16"
    return None


def layer_reason(linear: nn.Module, dtype: torch.dtype = torch.float16, backend: str = "cutlass") -> str | None:
    """Why ``linear`` cannot be converted (pure, CPU-safe), or None when it can.

    Checks: the 2:4 eligibility of :func:`lotus_deploy.sparsity24.eligible`, the backend's
    minimum shape (rows and columns multiples of its tile for ``dtype``) and that the weight is
    2:4 along ``in_features``.
    """
    from lotus_deploy.prune.two_four import eligible, is_two_four

    why = eligible(linear)
    if why:
        return why
    cls = backend_class(backend)
    tile = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    out_f, in_f = linear.weight.shape
    if tile is not None and (out_f % tile.sparse_min_rows or in_f % tile.sparse_min_cols):
        return (f"weight {out_f}x{in_f} is not a multiple of the {backend} tile "
                f"{tile.sparse_min_rows}x{tile.sparse_min_cols} for {str(dtype).replace('torch.', '')}")
    if not is_two_four(linear.weight, axis=1):
        return "weight is not 2:4 along in_features (run a semi_structured stage and bake first)"
    return None


def to_semi_structured_(
    model: nn.Module,
    scope: Iterable[str] = DEFAULT_SCOPE,
    dtype: torch.dtype = torch.float16,
    backend: str | None = None,
) -> dict:
    """Convert the 2:4 Linear weights in ``scope`` to semi-structured sparse tensors, in place.

    The whole model is moved to CUDA in ``dtype`` first (the sparse kernels take half-precision
    activations). Linears that are not eligible stay dense and are listed with the reason.

    Returns:
        A JSON-able report: ``backend``, ``dtype``, ``converted`` (module names) and ``skipped``
        (module name -> reason).

    Raises:
        SemiStructuredUnavailable: no CUDA GPU with compute capability >= 8.0, or a dtype other
            than fp16/bf16.
    """
    from lotus_deploy.scope import matches

    why = unavailable_reason(dtype)
    if why:
        raise SemiStructuredUnavailable(why)
    backend = backend or ("cusparselt" if torch.backends.cusparselt.is_available() else "cutlass")
    cls = backend_class(backend)
    model.to("cuda", dtype).eval()
    scope = tuple(scope)
    converted, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not matches(name, scope):
            continue
        why = layer_reason(mod, dtype, backend)
        if why is None:
            try:
                sparse = cls.from_dense(mod.weight.detach().contiguous())
                mod.weight = nn.Parameter(sparse, requires_grad=False)
                converted.append(name)
                continue
            except Exception as e:  # noqa: BLE001 — the kernel library refused: report, keep dense
                why = f"{type(e).__name__}: {e}"
        skipped[name] = why
    return {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "converted": converted, "skipped": skipped}
