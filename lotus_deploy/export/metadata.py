"""The preprocessing a model expects, carried inside the ONNX file (``metadata_props``).

``preprocess.json`` next to ``model.onnx`` says how to turn an image into the model's input; a
bare ``.onnx`` copied elsewhere lost it, and a client guessing ImageNet mean/std gets a worse
model (issue 14.16: 21.8 % instead of 31.8 % top-1 on the demo). So the export writes the same
keys into the ONNX ``metadata_props`` (what ONNX Runtime returns as
``session.get_modelmeta().custom_metadata_map``), each value JSON-encoded:

    input_size     [C, H, W] in pixels
    mean, std      per channel, applied after scaling pixels to [0, 1]
    interpolation  resize filter (bicubic, bilinear, ...)
    classes        class names by output index
    input, output  the graph's input and output names
    normalize      the recipe in words (not JSON)
    precision      a converted file's precision (fp16, bf16, int8, fp8; not JSON)

:func:`read_preprocess` reads them back as the dict ``preprocess.json`` holds, so a loader can use
a bare ONNX file when ``preprocess.json`` is absent. onnx is imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation", "classes", "input", "output")
"""Keys of ``preprocess.json`` that go into ``metadata_props`` (JSON-encoded values)."""

NORMALIZE_TEXT = "RGB, resize to input_size (H, W) with interpolation, pixels / 255, then (x - mean) / std per channel; NCHW float32"


def preprocess_metadata(pre: dict[str, Any]) -> dict[str, str]:
    """``metadata_props`` entries (key -> string) of a ``preprocess.json`` dict; keys it lacks are left out."""
    out = {k: json.dumps(pre[k]) for k in PREPROCESS_KEYS if pre.get(k) is not None}
    if "mean" in out:
        out["normalize"] = NORMALIZE_TEXT
    return out


def set_metadata(model, entries: dict[str, str]) -> None:
    """Set ``entries`` in an ``onnx.ModelProto``'s ``metadata_props`` (replacing keys already there)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for k, v in [*kept, *entries.items()]:
        prop = model.metadata_props.add()
        prop.key, prop.value = k, v


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (weights not loaded)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def read_preprocess(path: str | Path) -> dict[str, Any] | None:
    """The preprocessing an ONNX file carries, shaped like ``preprocess.json``; None when it has none.

    Values that are not JSON are skipped; ``input_size``, ``mean`` and ``std`` must all be there.
    """
    props = onnx_metadata(path)
    out: dict[str, Any] = {}
    for k in PREPROCESS_KEYS:
        if k in props:
            try:
                out[k] = json.loads(props[k])
            except json.JSONDecodeError:
                continue
    return out if all(k in out for k in ("input_size", "mean", "std")) else None
