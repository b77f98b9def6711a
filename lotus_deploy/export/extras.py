"""Optional packages of the export, checked before anything is written (one line naming the extra).

* ``export.dynamo: true``: torch's dynamo ONNX exporter imports onnxscript (the ``dynamo`` extra;
  the ``precision`` extra brings it too). Without it the export used to fail after training with
  ``No module named 'onnxscript'`` (issue 14.15).
* ``export.precision`` other than fp32, and an ``engine`` stage whose precision needs a converted
  ONNX on the TensorRT that is installed (or 11, what ``pip install tensorrt`` gives): the
  ``precision`` extra (:func:`lotus_deploy.export.precision.require_converter`).

Light: no torch, onnx or tensorrt import (``lotus validate`` runs :func:`recipe_problems`).
"""

from __future__ import annotations

import importlib.util

from lotus_deploy.errors import RunError

DYNAMO_HINT = "pip install -e '.[dynamo]'"


class ExporterUnavailable(RunError):
    """``export.dynamo: true`` without onnxscript (the message names the extra)."""


def require_exporter(dynamo: bool) -> None:
    """Raise :class:`ExporterUnavailable` (one line) when the chosen ONNX exporter cannot run here."""
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        raise ExporterUnavailable(f"export.dynamo: true needs onnxscript, not installed: {DYNAMO_HINT} (or use the default exporter, dynamo: false)")


def installed_trt_major() -> int | None:
    """The major version of the installed tensorrt distribution, read from its metadata (no import)."""
    import importlib.metadata

    try:
        return int(importlib.metadata.version("tensorrt").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def recipe_problems(recipe) -> list[tuple[str, str]]:
    """``(field, problem)`` for every export setting of ``recipe`` whose packages are missing here."""
    from lotus_deploy.export.precision import PrecisionUnavailable, require_converter
    from lotus_deploy.export.trt import DEFAULT_MAJOR, source_precision

    out: list[tuple[str, str]] = []
    try:
        require_exporter(recipe.export.dynamo)
    except ExporterUnavailable as e:
        out.append(("export.dynamo", str(e).removeprefix("export.dynamo: ")))
    needed: list[tuple[str, str]] = []  # (field, precision of the ONNX it needs)
    if any(s.kind == "export" for s in recipe.stages):
        needed.append(("export.precision", recipe.export.precision))
    major = installed_trt_major() or DEFAULT_MAJOR
    for i, s in enumerate(recipe.stages):
        if s.kind == "engine" and s.if_unavailable == "fail":
            needed.append((f"stages.{i}.precision", source_precision(major, s.precision, s.strongly_typed)))
    for field, precision in needed:
        try:
            require_converter(precision)
        except PrecisionUnavailable as e:
            out.append((field, str(e)))
    return out
