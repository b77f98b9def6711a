"""A Triton Inference Server model repository for an exported model.

Layout written by :func:`write_repository`::

    DIR/<name>/config.pbtxt
    DIR/<name>/labels.txt          class names, one a line (classification extension)
    DIR/<name>/1/model.onnx        platform onnxruntime_onnx   (or)
    DIR/<name>/1/model.plan        platform tensorrt_plan

``config.pbtxt`` is protobuf text of Triton's ``ModelConfig``: name, platform, max_batch_size,
one NCHW input and one output with the element types of the ONNX graph (or the engine's I/O)
and dims *without* the batch axis, dynamic batching with preferred batch sizes, ``parameters``:
``precision`` (what the model computes in: fp32, fp16, bf16, int8 or fp8, from the ONNX's types
or the engine sidecar) and the preprocessing a client must apply (``input_size``, ``mean``,
``std``, ``interpolation``, ``classes``, JSON-encoded, and ``normalize`` in words, as in the ONNX
``metadata_props``: :mod:`lotus_deploy.export.metadata`), and a GPU instance group for TensorRT
plans (a plan only runs on the GPU it was built for; ONNX models leave the choice to Triton).
An existing version of a model is not replaced unless asked (``force``). Tested by parsing the
written file.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from lotus_deploy.errors import RunError

PLATFORMS = {".onnx": ("onnxruntime_onnx", "model.onnx"), ".plan": ("tensorrt_plan", "model.plan"), ".engine": ("tensorrt_plan", "model.plan")}
DTYPES = {
    "float32": "TYPE_FP32", "FLOAT": "TYPE_FP32", "float16": "TYPE_FP16", "HALF": "TYPE_FP16", "bfloat16": "TYPE_BF16", "BF16": "TYPE_BF16",
    "int8": "TYPE_INT8", "INT8": "TYPE_INT8", "uint8": "TYPE_UINT8", "UINT8": "TYPE_UINT8", "float64": "TYPE_FP64",
}
"""numpy / TensorRT element type names -> Triton data types of model I/O."""


class VersionExists(RunError):
    """The model repository already holds the version to write (replace it with ``force``)."""


def check_version(repo_dir: str | Path, name: str, version: int, force: bool = False) -> Path:
    """``repo_dir/<name>/<version>``, the folder a model version goes to; raises :class:`VersionExists`
    (one line) when it holds files and ``force`` is not set. Writes nothing.

    Raises:
        ValueError: a version below 1 or a name Triton cannot take.
    """
    if version < 1:
        raise ValueError(f"Triton model versions start at 1, got {version}")
    vdir = Path(repo_dir) / model_name(name) / str(version)
    if not force and vdir.is_dir() and any(vdir.iterdir()):
        raise VersionExists(f"{vdir} already holds version {version} of Triton model {model_name(name)!r}: "
                            "choose another version (--triton-version) or replace it (--force)")
    return vdir


def triton_dtype(name: str) -> str:
    """Triton's data type of an I/O element type name; ValueError for one Triton has no type for here."""
    if name not in DTYPES:
        raise ValueError(f"no Triton data type for model I/O of element type {name!r}")
    return DTYPES[name]


def model_name(text: str) -> str:
    """A Triton-safe model name (letters, digits, ``_``, ``-``, ``.``)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    if not name:
        raise ValueError(f"cannot make a model name from {text!r}")
    return name


def preferred_batches(max_batch: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch`` (and ``max_batch`` itself)."""
    out = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < max_batch]
    return out + [max_batch]


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(d: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(x)) for x in d) + " ]"


def config_pbtxt(
    name: str,
    platform: str,
    max_batch_size: int,
    input_name: str,
    input_dims: Sequence[int],
    output_name: str,
    output_dims: Sequence[int],
    input_dtype: str = "TYPE_FP32",
    output_dtype: str = "TYPE_FP32",
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_us: int = 100,
    label_file: str | None = "labels.txt",
    gpu_instances: int | None = None,
    precision: str | None = None,
    parameters: dict[str, str] | None = None,
) -> str:
    """The text of ``config.pbtxt`` (dims exclude the batch axis; ``precision`` and ``parameters`` as
    string model parameters, in that order)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 (batching models), got {max_batch_size}")
    pref = sorted({b for b in (preferred_batch_sizes or preferred_batches(max_batch_size)) if 1 <= b <= max_batch_size})
    lines = [
        f"name: {_q(name)}",
        f"platform: {_q(platform)}",
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f"    name: {_q(input_name)}",
        f"    data_type: {input_dtype}",
        "    format: FORMAT_NCHW",
        f"    dims: {_dims(input_dims)}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_q(output_name)}",
        f"    data_type: {output_dtype}",
        f"    dims: {_dims(output_dims)}",
        *([f"    label_filename: {_q(label_file)}"] if label_file else []),
        "  }",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(pref)}",
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        "}",
    ]
    params = {**({"precision": precision} if precision else {}), **(parameters or {})}
    for key, value in params.items():
        lines += ["parameters {", f"  key: {_q(key)}", f"  value {{ string_value: {_q(value)} }}", "}"]
    if gpu_instances:
        lines += ["instance_group [", "  {", f"    count: {int(gpu_instances)}", "    kind: KIND_GPU", "  }", "]"]
    return "\n".join(lines) + "\n"


def _engine_io(sidecar: dict) -> tuple[dict, dict]:
    io = sidecar.get("io") or []
    ins = [t for t in io if t.get("mode") == "input"]
    outs = [t for t in io if t.get("mode") == "output"]
    if len(ins) != 1 or len(outs) != 1:
        raise ValueError(f"the engine sidecar lists inputs {ins} and outputs {outs}; expected one of each")
    return ins[0], outs[0]


def write_repository(
    model_path: str | Path,
    repo_dir: str | Path,
    name: str,
    max_batch_size: int | None = None,
    classes: Sequence[str] | None = None,
    version: int = 1,
    max_queue_delay_us: int = 100,
    precision: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``repo_dir/<name>/`` for an ONNX file or a TensorRT engine; returns config.pbtxt's path.

    Input/output names and shapes come from the ONNX graph, or from the engine's JSON sidecar
    (``<engine>.json`` written by :func:`lotus_deploy.export.trt.build_engine`). The preprocessing
    comes from ``preprocess.json`` next to the model, else from the ONNX ``metadata_props`` or the
    sidecar.

    Args:
        max_batch_size: images per request batch; default 32 for ONNX, the engine profile's max
            for a plan (a larger value is refused: the engine cannot run it).
        classes: class names for ``labels.txt`` (default: the preprocessing's).
        version: the model version folder (>= 1).
        precision: recorded as the ``precision`` parameter; default: what the ONNX holds
            (:func:`lotus_deploy.export.graph_precision.onnx_precision`) or the engine was built in
            (its sidecar).
        force: replace the version when it exists (else :class:`VersionExists`); the
            ``config.pbtxt`` and ``labels.txt`` of the model are rewritten either way.

    Raises:
        ValueError: unknown model type, missing sidecar, or a batch size the engine cannot run.
        VersionExists: the version exists and ``force`` is not set (nothing written).
    """
    import json

    from lotus_deploy.export.metadata import preprocess_metadata

    model_path, repo_dir = Path(model_path), Path(repo_dir)
    suffix = model_path.suffix.lower()
    if suffix not in PLATFORMS:
        raise ValueError(f"Triton needs an .onnx or .plan/.engine file, got {model_path.name}")
    platform, filename = PLATFORMS[suffix]
    name = model_name(name)
    vdir = check_version(repo_dir, name, version, force)
    pre_path = model_path.with_name("preprocess.json")
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}

    if platform == "onnxruntime_onnx":
        import onnx

        from lotus_deploy.export.graph_precision import onnx_precision
        from lotus_deploy.export.metadata import read_preprocess

        m = onnx.load(str(model_path), load_external_data=False)
        g = m.graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1 or len(g.output) != 1:
            raise ValueError(f"{model_path}: expected one input and one output, got {len(inputs)} and {len(g.output)}")

        def shape(v) -> list[int]:
            return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

        def dtype(v) -> str:
            return triton_dtype(onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type))

        inp, out = inputs[0], g.output[0]
        in_name, in_dims, in_dt = inp.name, shape(inp)[1:], dtype(inp)
        out_name, out_dims, out_dt = out.name, shape(out)[1:], dtype(out)
        max_batch_size = max_batch_size or 32
        gpu_instances = None
        precision = precision or onnx_precision(m)
        pre = pre or read_preprocess(model_path) or {}
    else:
        side_path = model_path.with_name(model_path.name + ".json")
        if not side_path.is_file():
            raise ValueError(f"no sidecar {side_path.name} next to {model_path.name}: build the engine with lotus (it records the I/O)")
        side = json.loads(side_path.read_text())
        i, o = _engine_io(side)
        in_name, in_dims, in_dt = i["name"], i["shape"][1:], triton_dtype(i["dtype"])
        out_name, out_dims, out_dt = o["name"], o["shape"][1:], triton_dtype(o["dtype"])
        engine_max = int(side["profiles"][in_name]["max"][0])
        if max_batch_size is not None and max_batch_size > engine_max:
            raise ValueError(f"max_batch_size {max_batch_size} exceeds the engine's profile maximum {engine_max}")
        max_batch_size = max_batch_size or engine_max
        gpu_instances = 1
        pre = pre or (side.get("preprocess") or {})
        precision = precision or (side.get("precision") or {}).get("built")
    if any(d < 0 for d in [*in_dims, *out_dims]):
        raise ValueError(f"only the batch axis may be dynamic; got input dims {in_dims}, output dims {out_dims}")

    classes = list(classes) if classes is not None else list(pre.get("classes") or [])
    if classes and len(classes) != out_dims[-1]:
        raise ValueError(f"{len(classes)} class names for an output of {out_dims[-1]} values")
    params = {k: v for k, v in preprocess_metadata({**pre, "classes": classes or None}).items() if k not in ("input", "output")}
    model_dir = repo_dir / name
    if force and vdir.is_dir():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, vdir / filename)
    from lotus_deploy.files import write_text

    if classes:
        write_text(model_dir / "labels.txt", "\n".join(classes) + "\n")
    text = config_pbtxt(
        name, platform, max_batch_size, in_name, in_dims, out_name, out_dims, in_dt, out_dt,
        max_queue_delay_us=max_queue_delay_us, label_file="labels.txt" if classes else None, gpu_instances=gpu_instances,
        precision=precision, parameters=params,
    )
    return write_text(model_dir / "config.pbtxt", text)
