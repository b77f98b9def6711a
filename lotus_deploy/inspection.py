"""``lotus inspect``: per-layer shape, sparsity and 2:4 compliance of checkpoints, runs and ONNX files.

The 2:4 pattern is checked along each weight's *reduction* axis, the one sparse kernels need:

* PyTorch checkpoints (``.safetensors``, ``.pth``): ``*.weight`` tensors of rank 2 (Linear
  ``[out, in]``) and rank 4 (Conv2d ``[O, I, kh, kw]``), axis 1.
* ONNX: the axis follows the op that consumes the weight, traced through Cast, Identity,
  (De)QuantizeLinear and Transpose; quantized (Q/DQ) weights are judged on ``q - zero_point``.
  The rules and the weight discovery live in :mod:`lotus_deploy.export.verify`, next to the
  export's 2:4 gate that uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lotus_deploy.errors import InputError
from lotus_deploy.export.verify import float_types, onnx_weights
from lotus_deploy.export.verify import weight_stats as _stats
from lotus_deploy.files import CHECKPOINT_SUFFIXES, read_onnx


def _totals(rows: Iterable[dict]) -> dict[str, Any]:
    rows = list(rows)
    params = sum(r["params"] for r in rows)
    nonzeros = sum(r["nonzeros"] for r in rows)
    return {"params": params, "nonzeros": nonzeros, "sparsity": 0.0 if params == 0 else 1.0 - nonzeros / params}


# ----------------------------------------------------------------------------- checkpoints


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    import torch

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


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Layers (weights of MatMul/Gemm/Conv, 2:4 along the op's reduction axis) and totals of an ONNX file.

    Returns:
        ``{"kind": "onnx", "path", "bytes", "opset", "layers", "layer_totals", "totals",
        "two_four_layers", "notes"}``; ``totals`` counts every constant float initializer and
        every quantized layer weight (its zeros: ``q == zero_point``).
    """
    from onnx import numpy_helper

    path = Path(path)
    model = read_onnx(path)
    weights, notes = onnx_weights(model)
    layers = [r for r, _ in weights]
    graph_inputs = {i.name for i in model.graph.input}
    floats = float_types()
    every = {r["name"]: r for r in layers if r["constant"]}  # quantized weights counted as dequantized
    for t in model.graph.initializer:
        if t.data_type in floats and t.name not in graph_inputs and t.name not in every:
            n = int(np.prod(t.dims)) if t.dims else 1
            every[t.name] = {"params": n, "nonzeros": int(np.count_nonzero(numpy_helper.to_array(t)))}
    notes["overridable_initializers"] = sorted(r["name"] for r in layers if not r["constant"])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "kind": "onnx",
        "path": str(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "layers": layers,
        "layer_totals": _totals(r for r in layers if r["constant"]),
        "totals": _totals(every.values()),
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
        InputError: a file of another kind, or one that cannot be read.
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
    raise InputError(f"cannot inspect {path}: expected a run directory, .onnx or {'/'.join(CHECKPOINT_SUFFIXES)}")


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


__all__ = ["inspect_path", "inspect_checkpoint", "inspect_onnx", "inspect_run", "format_report"]
