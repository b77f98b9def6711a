"""ONNX export checked against PyTorch with ONNX Runtime on real eval images.

onnx and onnxruntime are imported inside the functions (lazy), so importing lotus stays cheap.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lotus_deploy.export.verify import ExportError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

__all__ = ["ExportError", "export_onnx", "compare_with_torch", "onnx_weight_zeros", "torch_weight_zeros", "export_checked"]


def export_onnx(model: torch.nn.Module, path: str | Path, example: torch.Tensor, opset: int = 17, dynamo: bool = False,
                metadata: dict[str, str] | None = None) -> Path:
    """Export ``model`` (eval mode, CPU, fp32) to ONNX with a dynamic batch axis, atomically.

    Args:
        example: one input batch ``(B, C, H, W)`` that fixes C, H and W.
        dynamo: torch's dynamo exporter (needs onnxscript: :func:`lotus_deploy.export.extras.require_exporter`).
        metadata: ``metadata_props`` to write into the file (e.g.
            :func:`lotus_deploy.export.metadata.preprocess_metadata`).

    Returns:
        The written path (input ``input``, output ``logits``; ``onnx.checker`` passed).
    """
    import contextlib
    import sys

    import onnx

    from lotus_deploy.export.extras import require_exporter
    from lotus_deploy.files import atomic_path

    require_exporter(dynamo)
    model = model.eval().to("cpu")
    example = example.to("cpu", torch.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        kwargs = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about timm's shape asserts
            if dynamo:
                batch = torch.export.Dim("batch", min=1)
                with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the command's output
                    torch.onnx.export(model, (example,), str(tmp), dynamo=True, dynamic_shapes=({0: batch},), external_data=False, **kwargs)
            else:
                torch.onnx.export(
                    model, (example,), str(tmp), dynamo=False,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **kwargs,
                )
        if metadata:
            from lotus_deploy.export.metadata import set_metadata

            m = onnx.load(str(tmp))
            set_metadata(m, metadata)
            onnx.save(m, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def compare_with_torch(path: str | Path, model: torch.nn.Module, images: torch.Tensor, batch: int = 16) -> dict:
    """Run ONNX Runtime (CPU) and PyTorch on ``images``; max |diff| of logits and top-1 agreement."""
    from lotus_deploy.runtime import ort_session

    sess = ort_session(path)
    model = model.eval().to("cpu")
    diffs, agree, n = [], 0, 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float()
            ref = model(x)  # (B, classes)
            got = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
            diffs.append((ref - got).abs().max().item())
            agree += (ref.argmax(1) == got.argmax(1)).sum().item()
            n += len(x)
    return {"max_abs_diff": max(diffs), "top1_agreement": agree / n, "images": n}


def onnx_weight_zeros(path: str | Path) -> dict[str, int]:
    """Zero and total counts over the ONNX graph's float initializers of rank >= 2 (weights)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    zeros = total = 0
    for init in onnx.load(str(path)).graph.initializer:
        if len(init.dims) >= 2:
            a = numpy_helper.to_array(init)
            if np.issubdtype(a.dtype, np.floating):
                zeros += int((a == 0).sum())
                total += a.size
    return {"zeros": zeros, "weights": total}


def torch_weight_zeros(model: torch.nn.Module) -> dict[str, int]:
    """The same counts over the model's parameters of rank >= 2."""
    zeros = total = 0
    for p in model.parameters():
        if p.ndim >= 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return {"zeros": zeros, "weights": total}


def export_checked(model, path, images: torch.Tensor, opset: int = 17, dynamo: bool = False, tolerance: float = 1e-3,
                   metadata: dict[str, str] | None = None) -> dict:
    """Export (``metadata`` into ``metadata_props``), check with onnx.checker and against PyTorch;
    raises :class:`ExportError` when off.

    Returns:
        Metrics: ``max_abs_diff``, ``top1_agreement``, ``images``, zero counts in ONNX and
        PyTorch weights, file size in bytes, opset.
    """
    path = export_onnx(model, path, images[:1], opset=opset, dynamo=dynamo, metadata=metadata)
    parity = compare_with_torch(path, model, images)
    oz, tz = onnx_weight_zeros(path), torch_weight_zeros(model)
    metrics = {
        **parity,
        "onnx_weight_zeros": oz["zeros"],
        "torch_weight_zeros": tz["zeros"],
        "bytes": Path(path).stat().st_size,
        "opset": opset,
        "tolerance": tolerance,
    }
    if not parity["max_abs_diff"] <= tolerance:  # NaN fails too
        raise ExportError(f"ONNX Runtime differs from PyTorch by {parity['max_abs_diff']:.3g} > tolerance {tolerance:g} on {parity['images']} eval images")
    if oz["zeros"] < tz["zeros"]:
        raise ExportError(f"the ONNX weights hold {oz['zeros']} zeros but the model has {tz['zeros']}: zeros were lost in export")
    return metrics
