"""The export's 2:4 gate: ONNX weight discovery and the check that layers made 2:4 stay 2:4.

The 2:4 pattern is checked along each weight's *reduction* axis K, the one sparse kernels need.
The axis follows the op that consumes the weight: MatMul B -> axis 0 (rank-2; in general the
second to last), MatMul A -> its last axis; Gemm B -> axis 1 if ``transB`` else 0 (A -> 0 if
``transA`` else 1); Conv W -> axis 1. The weight may reach the op through Cast, Identity,
(De)QuantizeLinear (axis unchanged, :data:`AXIS_KEEPING_OPS`) and Transpose (axis mapped through
``perm``), as polygraphy's sparsity check does. Only constant initializers count: an initializer
that is also a graph input can be overridden at run time, and tensors from ``Constant`` nodes
are ignored (counted in ``notes``; the exporters used here emit initializers).

Quantized graphs (explicit Q/DQ, as TensorRT wants INT8/FP8): a weight stored as an integer or
FP8 initializer that reaches the op through ``DequantizeLinear`` is judged on ``q - zero_point``,
so a zero weight is one whose dequantized value is 0. A float weight fake-quantized in the graph
(``W -> QuantizeLinear -> DequantizeLinear``) is judged on ``W``: symmetric quantization maps 0
to the zero point 0, so ``W`` and its dequantized value have the same zeros.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from lotus_deploy.prune.two_four import GROUP, two_four_violations

AXIS_KEEPING_OPS = ("Cast", "Identity", "QuantizeLinear", "DequantizeLinear")
"""Ops a weight may pass through on its way to a MatMul/Gemm/Conv without moving its axes."""


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees with PyTorch beyond tolerance (also importable from
    :mod:`lotus_deploy.export.onnx_export`; defined here so the checks import no exporter)."""


def weight_stats(a: np.ndarray, axis: int | None) -> dict[str, Any]:
    """Counts and 2:4 compliance of one weight (numpy); ``axis`` None: counts only."""
    nonzeros = int(np.count_nonzero(a))
    viol = two_four_violations(a, axis) if axis is not None else None
    return {
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "axis": axis,
        "params": int(a.size),
        "nonzeros": nonzeros,
        "sparsity": 0.0 if a.size == 0 else 1.0 - nonzeros / a.size,
        "two_four": None if viol is None else viol == 0,
        "groups": int(a.size // GROUP) if viol is not None else 0,
        "violations": viol,
    }


def float_types() -> set[int]:
    """ONNX element types of float weights."""
    from onnx import TensorProto

    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def quantized_types() -> set[int]:
    """ONNX element types of quantized weights (read through ``DequantizeLinear``)."""
    from onnx import TensorProto

    names = ("INT8", "UINT8", "INT4", "UINT4", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
    return {getattr(TensorProto, n) for n in names if hasattr(TensorProto, n)}


def _weight_inputs(node) -> list[tuple[int, str, int]]:
    """(input index, role, reduction axis; negative = from the end) of the op's weight operands."""
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMul":
        return [(0, "A", -1), (1, "B", -2)]
    if node.op_type == "Gemm":
        return [(0, "A", 0 if attrs.get("transA", 0) else 1), (1, "B", 1 if attrs.get("transB", 0) else 0)]
    if node.op_type == "Conv":
        return [(1, "W", 1)]
    return []


def _as_float(a: np.ndarray) -> np.ndarray:
    """bfloat16 / FP8 / small integer arrays as float32 (numpy cannot count or compare some of them)."""
    return a if a.dtype in (np.float32, np.float64, np.float16) else a.astype(np.float32)


def _dequant_zero(q: np.ndarray, dq, inits: dict, to_array) -> np.ndarray:
    """``q - zero_point`` of a weight read by DequantizeLinear ``dq`` (float32; 0 where the weight is 0)."""
    q = _as_float(q)
    if len(dq.input) < 3 or not dq.input[2]:
        return q
    zp = _as_float(to_array(inits[dq.input[2]])) if dq.input[2] in inits else None
    if zp is None or not np.any(zp):
        return q
    if zp.size > 1:  # per-axis zero point along the node's axis (default 1)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    return q - zp


def onnx_weights(model) -> tuple[list[tuple[dict, np.ndarray]], dict[str, Any]]:
    """Every float (or Q/DQ-quantized) initializer a MatMul, Gemm or Conv consumes as a weight, with its reduction axis.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        (list of (row, array), notes). A row: initializer ``name``, consuming ``op``, ``node``
        name, ``input`` role (A/B/W), ``via`` (ops traced through), ``constant`` (False for an
        overridable graph input, whose 2:4 status is then not judged), shape, ``dtype`` (as
        stored), counts, ``two_four`` (None when the axis length is not a multiple of 4),
        ``violations``. The array is float32 for bfloat16 weights and ``q - zero_point`` for
        quantized ones.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    producers = {o: n for n in g.node for o in n.output}
    floats, quantized = float_types(), quantized_types()
    notes: dict[str, Any] = {"constant_node_weights_ignored": 0}
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    seen: set[tuple[str, int]] = set()
    out: list[tuple[dict, np.ndarray]] = []

    def trace(name: str, axis: int, via: tuple[str, ...], dq=None):
        if name in inits:
            return name, axis, via, dq
        p = producers.get(name)
        if p is None:
            return None
        if p.op_type in AXIS_KEEPING_OPS:
            return trace(p.input[0], axis, via + (p.op_type,), p if p.op_type == "DequantizeLinear" else dq)
        if p.op_type == "Transpose":
            perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
            if perm is None:  # default: reverse the axes
                src = inits.get(p.input[0])
                if src is None:
                    return None
                perm = list(range(len(src.dims)))[::-1]
            return trace(p.input[0], perm[axis % len(perm)], via + ("Transpose",), dq)
        if p.op_type == "Constant":
            notes["constant_node_weights_ignored"] += 1
        return None

    for node in g.node:
        for idx, role, axis in _weight_inputs(node):
            if idx >= len(node.input) or not node.input[idx]:
                continue
            hit = trace(node.input[idx], axis, ())
            if hit is None:
                continue
            name, ax, via, dq = hit
            t = inits[name]
            if t.data_type not in floats and not (dq is not None and t.data_type in quantized):
                continue
            ax = ax % len(t.dims) if t.dims else 0
            if (name, ax) in seen:
                continue
            seen.add((name, ax))
            if name not in arrays:
                a = numpy_helper.to_array(t)
                stored = str(a.dtype)
                arrays[name] = (_dequant_zero(a, dq, inits, numpy_helper.to_array) if t.data_type in quantized else _as_float(a)), stored
            a, stored = arrays[name]
            constant = name not in graph_inputs
            row = {
                "name": name, "op": node.op_type, "node": node.name, "input": role, "via": list(via),
                "constant": constant, **weight_stats(a, ax), "dtype": stored,
            }
            if not constant:
                row.update(two_four=None, violations=None)
            out.append((row, a))
    return out, notes


# ----------------------------------------------------------------------------- the export's gate


def _key(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a.astype(np.float32))
    return a.shape, hashlib.sha256(a.tobytes()).hexdigest()


def _by_name(rows: list[tuple[dict, np.ndarray]], name: str, shape: tuple) -> dict | None:
    """The row of a PyTorch weight found by name: the initializer is named like the parameter
    (dynamo exporter, Gemm heads) or the consuming node is scoped under the module
    (TorchScript: ``/blocks/blocks.0/mlp/fc1/MatMul`` for ``blocks.0.mlp.fc1.weight``)."""
    module = name.rpartition(".")[0]
    for row, a in rows:
        scoped = f".{module}." in (row["node"] or "").replace("/", ".") + "."
        if (row["name"] == name or scoped) and a.ndim == 2 and np.moveaxis(a, row["axis"], -1).shape == shape:
            return row
    return None


def verify_onnx_two_four(path: str | Path, weights: Mapping[str, Any]) -> dict[str, dict]:
    """Find each PyTorch Linear weight in the ONNX graph and check it is 2:4 there.

    Matching compares values first: an ONNX weight with its reduction axis (per the consuming
    op) moved last must equal the PyTorch weight ``[out, in]`` exactly. The TorchScript exporter
    stores block Linears as MatMul B = W^T ``[in, out]`` under names like ``onnx::MatMul_123``
    (axis 0), and the head as Gemm B = W with ``transB=1`` (axis 1). A value match also confirms
    that the axis TensorRT reads as K is the one 2:4 was applied along. When no value matches
    (e.g. weights cast to fp16, quantized, or altered by a graph optimizer), the weight is looked
    up by name (initializer named like the parameter, or node scoped under the module) with the
    same ``[out, in]`` shape after moving its reduction axis last, and its 2:4 compliance decides.

    Args:
        weights: PyTorch weight name -> ``(out, in)`` tensor as exported.

    Returns:
        weight name -> {name (initializer), op, node, input, axis, two_four, violations, matched}.

    Raises:
        ExportError: a weight has no constant ONNX counterpart, or is not 2:4 there.
    """
    import onnx

    rows = [(r, a) for r, a in onnx_weights(onnx.load(str(path)))[0] if a.ndim == 2 and r["constant"]]
    index: dict[tuple, dict] = {}
    for row, a in rows:
        index.setdefault(_key(np.moveaxis(a, row["axis"], -1)), row)
    found, problems = {}, []
    for name, w in weights.items():
        arr = w.detach().cpu().float().numpy() if hasattr(w, "detach") else np.asarray(w)
        row, how = index.get(_key(arr)), "values"
        if row is None:
            row, how = _by_name(rows, name, arr.shape), "name"
        if row is None:
            problems.append(f"{name}: no constant MatMul/Gemm weight in the graph equals it or is named after it (with its reduction axis last)")
            continue
        found[name] = {**{k: row[k] for k in ("name", "op", "node", "input", "axis", "two_four", "violations")}, "matched": how}
        if not row["two_four"]:
            problems.append(f"{name} -> {row['name']} ({row['op']} {row['input']}, axis {row['axis']}): {row['violations']} of {row['groups']} groups of 4 hold more than 2 non-zeros")
    if problems:
        raise ExportError(f"{len(problems)} layer(s) made 2:4 are not 2:4 in {Path(path).name}: " + "; ".join(problems))
    return found


def verify_export_two_four(path: str | Path, model, layers: Iterable[str], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The export stage's check: layers a ``semi_structured`` stage made 2:4 are 2:4 in the ONNX.

    Args:
        path: the exported ONNX file.
        model: the exported PyTorch model (masks applied).
        layers: weight names from the ``semi_structured`` stage's ``two_four_layers`` metric.

    Returns:
        ``{"layers", "checked", "onnx": {name: {...}}}`` or, when none of the layers is 2:4 in
        ``model`` (a variant saved before the stage, e.g. ``dense``), ``checked: 0`` with the reason.

    Raises:
        ExportError: some layers lost 2:4 in PyTorch already, or in the ONNX graph.
    """
    from lotus_deploy.prune.two_four import is_two_four

    params = dict(model.named_parameters())
    layers = sorted(layers)
    missing = [n for n in layers if n not in params]
    if missing:
        raise ExportError(f"2:4 layers not in the exported model: {missing}")
    torch_ok = [n for n in layers if is_two_four(params[n], 1)]
    if not torch_ok:
        why = "none of them is 2:4 in this model (a variant saved before the semi_structured stage)"
        if log:
            log(f"export: 2:4 check skipped for {len(layers)} layer(s): {why}")
        return {"layers": len(layers), "checked": 0, "skipped": why}
    lost = sorted(set(layers) - set(torch_ok))
    if lost:
        raise ExportError(f"{len(lost)} layer(s) made 2:4 are no longer 2:4 in the PyTorch weights: {lost}")
    found = verify_onnx_two_four(path, {n: params[n] for n in torch_ok})
    if log:
        log(f"export: all {len(found)} 2:4 layers are 2:4 in the ONNX graph along the reduction axis")
    return {"layers": len(layers), "checked": len(found), "onnx": found}


def two_four_kept(reference: str | Path, converted: str | Path) -> dict[str, Any]:
    """Check that every weight that is 2:4 in ``reference`` is still 2:4 in ``converted``.

    The precision step's gate: ``converted`` is ``reference`` after an fp16/bf16 conversion or a
    Q/DQ quantization, which may rename initializers but keeps the consuming MatMul/Gemm/Conv
    nodes, so weights are matched by (node name, input role).

    Returns:
        ``{"two_four_layers": n in reference, "kept": n still 2:4 in converted}``.

    Raises:
        ExportError: a 2:4 weight of ``reference`` is missing from ``converted`` or no longer 2:4.
    """
    import onnx

    def two_four(path) -> dict[tuple[str, str], dict]:
        return {(r["node"], r["input"]): r for r, _ in onnx_weights(onnx.load(str(path)))[0] if r["two_four"]}

    ref = two_four(reference)
    got = {(r["node"], r["input"]): r for r, _ in onnx_weights(onnx.load(str(converted)))[0]}
    lost = []
    for key, r in ref.items():
        g = got.get(key)
        if g is None:
            lost.append(f"{key[0]} {key[1]} ({r['name']}): no constant weight in {Path(converted).name}")
        elif not g["two_four"]:
            lost.append(f"{key[0]} {key[1]} ({g['name']}, {g['dtype']}): {g['violations']} of {g['groups']} groups of 4 hold more than 2 non-zeros")
    if lost:
        raise ExportError(f"{len(lost)} of {len(ref)} 2:4 weight(s) of {Path(reference).name} are not 2:4 in {Path(converted).name}: " + "; ".join(lost))
    return {"two_four_layers": len(ref), "kept": len(ref)}
