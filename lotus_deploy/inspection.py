"""``lotus inspect``: per-layer shape, sparsity and 2:4 compliance of checkpoints, runs and ONNX files.

The 2:4 pattern is checked along each weight's *reduction* axis, the one sparse kernels need:

* PyTorch checkpoints (``.safetensors``, ``.pth``): ``*.weight`` tensors of rank 2 (Linear
  ``[out, in]``) and rank 4 (Conv2d ``[O, I, kh, kw]``), axis 1.
* ONNX: the axis follows the op that consumes the weight: MatMul B -> axis 0 (rank-2; in
  general the second to last), MatMul A -> its last axis; Gemm B -> axis 1 if ``transB`` else 0
  (A -> 0 if ``transA`` else 1); Conv W -> axis 1. The weight may reach the op through Cast,
  Identity, (De)QuantizeLinear (axis unchanged) and Transpose (axis mapped through ``perm``), as
  polygraphy's sparsity check does. Only constant initializers count: an initializer that is
  also a graph input can be overridden at run time, and tensors from ``Constant`` nodes are
  ignored (counted in ``notes``; the exporters used here emit initializers).

:func:`verify_export_two_four` is what the export stage uses to fail when a layer made 2:4 is
not 2:4 in the ONNX graph.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from lotus_deploy.files import CHECKPOINT_SUFFIXES
from lotus_deploy.prune.two_four import GROUP, two_four_violations

AXIS_KEEPING_OPS = ("Cast", "Identity", "QuantizeLinear", "DequantizeLinear")


def _stats(a: np.ndarray, axis: int | None) -> dict[str, Any]:
    """Counts and 2:4 compliance of one weight (numpy)."""
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


def _totals(rows: Iterable[dict]) -> dict[str, Any]:
    rows = list(rows)
    params = sum(r["params"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    return {"params": params, "nonzeros": nonzeros, "sparsity": 0.0 if params == 0 else 1.0 - nonzeros / params}


# ----------------------------------------------------------------------------- checkpoints


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        from lotus_deploy.models import read_state_dict

        sd = read_state_dict(path)
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Layers (``*.weight`` of rank 2 or 4, 2:4 along axis 1) and totals of a PyTorch checkpoint.

    Returns:
        ``{"kind": "checkpoint", "path", "bytes", "layers": [...], "layer_totals", "totals",
        "two_four_layers"}``; ``totals`` counts every tensor, ``layer_totals`` only the layers.
    """
    path = Path(path)
    tensors = _read_tensors(path)
    layers, every = [], []
    for name, a in tensors.items():
        is_layer = name.endswith("weight") and a.ndim in (2, 4)  # masks files (bool) too: True = kept
        row = {"name": name, **_stats(a, 1 if is_layer else None)}
        every.append(row)
        if is_layer:
            layers.append(row)
    return {
        "kind": "checkpoint",
        "path": str(path),
        "bytes": path.stat().st_size,
        "layers": layers,
        "layer_totals": _totals(layers),
        "totals": _totals(every),
        "two_four_layers": sum(1 for r in layers if r["two_four"]),
    }


# ----------------------------------------------------------------------------- ONNX


def _float_types() -> set[int]:
    from onnx import TensorProto

    return {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


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


def onnx_weights(model) -> tuple[list[tuple[dict, np.ndarray]], dict[str, Any]]:
    """Every float initializer a MatMul, Gemm or Conv consumes as a weight, with its reduction axis.

    Args:
        model: an ``onnx.ModelProto``.

    Returns:
        (list of (row, array), notes). A row: initializer ``name``, consuming ``op``, ``node``
        name, ``input`` role (A/B/W), ``via`` (ops traced through), ``constant`` (False for an
        overridable graph input, whose 2:4 status is then not judged), shape, counts,
        ``two_four`` (None when the axis length is not a multiple of 4), ``violations``.
    """
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    producers = {o: n for n in g.node for o in n.output}
    floats = _float_types()
    notes: dict[str, Any] = {"constant_node_weights_ignored": 0}
    arrays: dict[str, np.ndarray] = {}
    seen: set[tuple[str, int]] = set()
    out: list[tuple[dict, np.ndarray]] = []

    def trace(name: str, axis: int, via: tuple[str, ...]):
        if name in inits:
            return name, axis, via
        p = producers.get(name)
        if p is None:
            return None
        if p.op_type in AXIS_KEEPING_OPS:
            return trace(p.input[0], axis, via + (p.op_type,))
        if p.op_type == "Transpose":
            perm = next((list(a.ints) for a in p.attribute if a.name == "perm"), None)
            if perm is None:  # default: reverse the axes
                src = inits.get(p.input[0])
                if src is None:
                    return None
                perm = list(range(len(src.dims)))[::-1]
            return trace(p.input[0], perm[axis % len(perm)], via + ("Transpose",))
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
            name, ax, via = hit
            t = inits[name]
            if t.data_type not in floats:
                continue
            ax = ax % len(t.dims) if t.dims else 0
            if (name, ax) in seen:
                continue
            seen.add((name, ax))
            if name not in arrays:
                a = numpy_helper.to_array(t)
                arrays[name] = a.astype(np.float32) if a.dtype.name == "bfloat16" else a
            a = arrays[name]
            constant = name not in graph_inputs
            row = {
                "name": name, "op": node.op_type, "node": node.name, "input": role, "via": list(via),
                "constant": constant, **_stats(a, ax),
            }
            if not constant:
                row.update(two_four=None, violations=None)
            out.append((row, a))
    return out, notes


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Layers (weights of MatMul/Gemm/Conv, 2:4 along the op's reduction axis) and totals of an ONNX file.

    Returns:
        ``{"kind": "onnx", "path", "bytes", "opset", "layers", "layer_totals", "totals",
        "two_four_layers", "notes"}``; ``totals`` counts every constant float initializer.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    weights, notes = onnx_weights(model)
    layers = [r for r, _ in weights]
    graph_inputs = {i.name for i in model.graph.input}
    floats = _float_types()
    every = []
    for t in model.graph.initializer:
        if t.data_type in floats and t.name not in graph_inputs:
            n = int(np.prod(t.dims)) if t.dims else 1
            every.append({"params": n, "nonzeros": int(np.count_nonzero(numpy_helper.to_array(t)))})
    notes["overridable_initializers"] = sorted(r["name"] for r in layers if not r["constant"])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "kind": "onnx",
        "path": str(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "layers": layers,
        "layer_totals": _totals(r for r in layers if r["constant"]),
        "totals": _totals(every),
        "two_four_layers": sum(1 for r in layers if r["two_four"]),
        "notes": notes,
    }


# ----------------------------------------------------------------------------- runs


def inspect_run(path: str | Path) -> dict[str, Any]:
    """Each distinct checkpoint of a run (with the variants that point at it) and its ONNX files."""
    from lotus_deploy.run import Run

    run = Run(path)
    by_path: dict[str, list[str]] = {}
    masks_of: dict[str, str] = {}
    for variant, entry in run.variants().items():
        arts = entry.get("artifacts", {})
        if "model" not in arts:
            continue
        by_path.setdefault(arts["model"]["path"], []).append(variant)
        if "masks" in arts:
            masks_of[arts["model"]["path"]] = arts["masks"]["path"]
    checkpoints = []
    for rel, variants in by_path.items():
        rep = inspect_checkpoint(run.dir / rel)
        rep["variants"] = variants
        if rel in masks_of:
            m = inspect_checkpoint(run.dir / masks_of[rel])
            rep["masks"] = {"path": masks_of[rel], "sparsity": m["totals"]["sparsity"]}
        checkpoints.append(rep)
    order = {n: i for i, n in enumerate(["initial"] + [e["name"] for e in run.manifest.get("stages", [])])}
    checkpoints.sort(key=lambda c: min(order.get(v, len(order)) for v in c["variants"]))
    onnx_files = [inspect_onnx(p) for p in sorted(run.dir.rglob("*.onnx")) if not p.name.startswith(".")]
    return {"kind": "run", "path": str(run.dir), "name": run.manifest.get("name"), "checkpoints": checkpoints, "onnx": onnx_files}


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Inspect a checkpoint (.safetensors/.pth/.pt/.bin), a run directory or an .onnx file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file of another kind.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        return inspect_run(path)
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return inspect_checkpoint(path)
    raise ValueError(f"cannot inspect {path.name}: expected a run directory, .onnx or {'/'.join(CHECKPOINT_SUFFIXES)}")


# ----------------------------------------------------------------------------- text


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _two_four_cell(r: dict) -> str:
    if r.get("two_four") is None:
        return "n/a" if r.get("constant", True) else "input"
    return "yes" if r["two_four"] else f"no ({r['violations']}/{r['groups']})"


def _table(layers: list[dict], onnx: bool) -> list[str]:
    head = ["layer", "op", "shape", "axis", "params", "nonzeros", "sparsity", "2:4"] if onnx else ["layer", "shape", "axis", "params", "nonzeros", "sparsity", "2:4"]
    rows = []
    for r in layers:
        name = f"{r['node'] or '?'} [{r['name']}]" if onnx else r["name"]
        cells = [name] + ([f"{r['op']} {r['input']}" + (" via " + ">".join(r["via"]) if r["via"] else "")] if onnx else [])
        cells += ["x".join(map(str, r["shape"])), str(r["axis"]), str(r["params"]), str(r["nonzeros"]), f"{100 * r['sparsity']:.1f}%", _two_four_cell(r)]
        rows.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *rows]]


def _summary(rep: dict) -> str:
    lt, t = rep["layer_totals"], rep["totals"]
    return (
        f"{len(rep['layers'])} layers, {rep['two_four_layers']} of them 2:4; layer weights {lt['nonzeros']:,}/{lt['params']:,} non-zero "
        f"({100 * lt['sparsity']:.1f}% sparse); all tensors {t['nonzeros']:,}/{t['params']:,} non-zero ({100 * t['sparsity']:.1f}% sparse)"
    )


def format_report(rep: dict) -> str:
    """Human-readable text of an :func:`inspect_path` result (run directories: tables for the final checkpoint and ONNX files)."""
    lines: list[str] = []
    if rep["kind"] == "run":
        lines.append(f"run {rep['name']} ({rep['path']})")
        final = None
        for c in rep["checkpoints"]:
            masks = f", masks {100 * c['masks']['sparsity']:.1f}% removed" if "masks" in c else ""
            lines.append(f"  {', '.join(c['variants'])}: {c['path']} ({_mb(c['bytes'])}{masks})")
            lines.append(f"    {_summary(c)}")
            if "final" in c["variants"]:
                final = c
        if final is not None:
            lines += ["", f"final: {final['path']}", *_table(final["layers"], False)]
        for o in rep["onnx"]:
            lines += ["", format_report(o)]
        return "\n".join(lines)
    onnx = rep["kind"] == "onnx"
    what = f"ONNX opset {rep['opset']}" if onnx else "checkpoint"
    lines.append(f"{rep['path']} ({what}, {_mb(rep['bytes'])})")
    lines += _table(rep["layers"], onnx)
    lines.append(_summary(rep))
    if onnx:
        n = rep["notes"]
        lines.append(
            "only constant initializers count"
            + (f"; {n['constant_node_weights_ignored']} weight(s) from Constant nodes ignored" if n["constant_node_weights_ignored"] else "")
            + (f"; overridable (graph input) initializers not judged: {', '.join(n['overridable_initializers'])}" if n["overridable_initializers"] else "")
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export check


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
    (e.g. weights cast to fp16, or altered by a graph optimizer), the weight is looked up by
    name (initializer named like the parameter, or node scoped under the module) with the same
    ``[out, in]`` shape after moving its reduction axis last, and its 2:4 compliance decides.

    Args:
        weights: PyTorch weight name -> ``(out, in)`` tensor as exported.

    Returns:
        weight name -> {name (initializer), op, node, input, axis, two_four, violations, matched}.

    Raises:
        ExportError: a weight has no constant ONNX counterpart, or is not 2:4 there.
    """
    import onnx

    from lotus_deploy.export.onnx_export import ExportError

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
    from lotus_deploy.export.onnx_export import ExportError
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


__all__ = [
    "inspect_path", "inspect_checkpoint", "inspect_onnx", "inspect_run", "onnx_weights", "format_report",
    "verify_onnx_two_four", "verify_export_two_four",
]
