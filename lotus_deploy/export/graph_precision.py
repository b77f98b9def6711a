"""The precision vocabulary of the export and what an ONNX graph's types say about it (pure, no lotus imports).

Kept apart from :mod:`lotus_deploy.export.precision` (the converters) so the TensorRT builder
and the Triton writer can read a graph's precision without importing the conversion step.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
"""Precisions of the exported ONNX (``model.<precision>.onnx``; fp32 is ``model.onnx`` itself)."""

QUANTIZED = ("int8", "fp8")
"""Precisions made by post-training quantization (explicit Q/DQ, calibrated)."""

def check_precision_name(precision: str) -> str:
    """``precision`` if known, else ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def onnx_precision(model) -> str:
    """The precision a strongly typed TensorRT build of ``model`` (an ``onnx.ModelProto``) computes in.

    ``DequantizeLinear`` nodes with FP8 data or zero points -> ``fp8``, INT8/UINT8 -> ``int8``;
    else the type of the weights (initializers of rank >= 2): float16 -> ``fp16``, bfloat16 ->
    ``bf16``, otherwise ``fp32``.
    """
    from onnx import TensorProto

    types = {t.name: t.data_type for t in model.graph.initializer}
    fp8 = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            data = {types.get(node.input[0])} | ({types.get(node.input[2])} if len(node.input) > 2 else set())
            if data & fp8:
                return "fp8"
            if data & {TensorProto.INT8, TensorProto.UINT8}:
                return "int8"
    weights = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
    return "fp16" if TensorProto.FLOAT16 in weights else "bf16" if TensorProto.BFLOAT16 in weights else "fp32"


def graph_facts(path: str | Path) -> dict[str, Any]:
    """IO element types, initializer types, Q/DQ and Cast node counts and :func:`onnx_precision` of an ONNX file."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    name = TensorProto.DataType.Name

    def io(values) -> dict[str, str]:
        return {v.name: name(v.type.tensor_type.elem_type) for v in values if v.name not in inits}

    ops = Counter(n.op_type for n in g.node)
    return {
        "precision": onnx_precision(model),
        "inputs": io(g.input),
        "outputs": io(g.output),
        "initializer_types": dict(Counter(name(t.data_type) for t in g.initializer)),
        "nodes": {k: ops[k] for k in ("QuantizeLinear", "DequantizeLinear", "Cast") if ops[k]},
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }
