"""The export's precision step: fp16 / bf16 / INT8 / FP8 ONNX from the checked fp32 ONNX, checked on the CPU.

TensorRT 11 builds every network strongly typed: the engine computes in the types the ONNX
holds, and the FP16/BF16/INT8/FP8 builder flags are gone. So the precision is made here, in the
ONNX, the way NVIDIA documents it:

* ``fp16`` / ``bf16``: ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``)
  casts the graph to the low precision and keeps the fp32 inputs and outputs (``keep_io_types``).
* ``int8`` / ``fp8``: ModelOpt's ONNX post-training quantization
  (``modelopt.onnx.quantization.quantize``) writes explicit Q/DQ nodes as TensorRT wants them:
  symmetric, per-channel weights stored quantized in front of a ``DequantizeLinear``
  (``dq_only``), per-tensor activations calibrated on ``calibration_images`` images of the train
  split (eval transform), non-quantized ops left fp32. Zero weights quantize to the zero point 0,
  so a 2:4 weight stays 2:4 (checked by :func:`lotus_deploy.export.verify.two_four_kept`).

Every converted file is checked against the fp32 ONNX on eval images (:func:`check_precision`):
top-1 agreement, max logit difference relative to the largest fp32 logit, and the drop of its own
top-1, with the tolerances of :data:`TOLERANCES`; non-finite logits fail. It runs on ONNX Runtime
CPU; where ONNX Runtime has no CPU kernel for a type (bf16 Conv, Expand), the ONNX reference
evaluator runs the graph instead and the result says so.

ModelOpt and the converters it needs live in the ``precision`` extra (not ModelOpt's own
``[onnx]`` extra, which pulls cupy and onnxruntime-gpu); without them the step raises
:class:`PrecisionUnavailable` with one line naming the extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from lotus_deploy.errors import RunError
from lotus_deploy.export.graph_precision import (
    QUANTIZED,
    check_precision_name,
    graph_facts,
)

INSTALL_HINT = "pip install -e '.[precision]'"

# import name -> pip name of what the conversions import (the `precision` extra in pyproject.toml)
REQUIRED_MODULES = {
    "modelopt": "nvidia-modelopt", "onnx_graphsurgeon": "onnx-graphsurgeon", "onnxscript": "onnxscript",
    "onnxslim": "onnxslim", "lief": "lief", "polygraphy": "polygraphy",
}


class PrecisionUnavailable(RunError):
    """The packages of the ``precision`` extra are missing (the message names the extra)."""


class PrecisionCheckError(RunError):
    """A converted ONNX disagrees with the fp32 ONNX beyond its precision's tolerance, or lost 2:4."""


@dataclass(frozen=True)
class Tolerance:
    """What a converted ONNX must meet against the fp32 ONNX on the same eval images.

    Attributes:
        min_agreement: fraction of images whose top-1 class equals the fp32 model's.
        max_top1_drop: top-1 points (of 100) it may lose against the fp32 model.
        max_rel_diff: max |logit - fp32 logit| divided by the largest |fp32 logit|.
    """

    min_agreement: float
    max_top1_drop: float
    max_rel_diff: float


TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(min_agreement=0.99, max_top1_drop=0.5, max_rel_diff=0.01),
    "bf16": Tolerance(min_agreement=0.98, max_top1_drop=1.0, max_rel_diff=0.05),
    "int8": Tolerance(min_agreement=0.95, max_top1_drop=2.0, max_rel_diff=0.25),
    "fp8": Tolerance(min_agreement=0.95, max_top1_drop=2.0, max_rel_diff=0.25),
}
"""Per precision. fp16 keeps 11 mantissa bits and bf16 8, so their logits move by ~1e-3 and ~1e-2
of their scale; INT8/FP8 round every GEMM input to 8 bits, so only the decisions are held tight."""


def missing_packages() -> list[str]:
    """pip names of the ``precision`` extra's packages that are not importable here."""
    return [pip for mod, pip in REQUIRED_MODULES.items() if importlib.util.find_spec(mod) is None]


def require_converter(precision: str) -> None:
    """Raise :class:`PrecisionUnavailable` (one line) when converting to ``precision`` cannot run here."""
    check_precision_name(precision)
    if precision == "fp32":
        return
    missing = missing_packages()
    if missing:
        raise PrecisionUnavailable(f"the {precision} ONNX needs {', '.join(missing)}, not installed: {INSTALL_HINT}")


# ----------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def _quiet_converters():
    """ModelOpt and ONNX Runtime's calibrator print progress on stdout: send it to stderr, log warnings only."""
    import logging

    with contextlib.redirect_stdout(sys.stderr):
        from modelopt.onnx.logging_config import configure_logging

        configure_logging(logging.WARNING)
        yield


def convert(src: str | Path, dst: str | Path, precision: str, calibration=None) -> Path:
    """Write ``dst``: the fp32 ONNX ``src`` in ``precision``, fp32 inputs and outputs kept.

    Args:
        src: the fp32 ONNX (one input ``(B, C, H, W)``, dynamic batch).
        dst: where the converted ONNX goes (written atomically).
        precision: ``fp16``, ``bf16``, ``int8`` or ``fp8``.
        calibration: ``(N, C, H, W)`` float32 numpy images, preprocessed like the eval split;
            required for ``int8``/``fp8`` (the activation ranges come from them).

    Raises:
        PrecisionUnavailable: the ``precision`` extra is not installed.
        ValueError: unknown precision, fp32, or no calibration images for a quantized one.
    """
    import shutil
    import tempfile

    import numpy as np
    import onnx

    from lotus_deploy.files import atomic_path

    require_converter(precision)
    if precision == "fp32":
        raise ValueError("fp32 is the exported model.onnx itself; nothing to convert")
    if precision in QUANTIZED and (calibration is None or len(calibration) == 0):
        raise ValueError(f"{precision} needs calibration images")
    with tempfile.TemporaryDirectory(prefix="lotus-precision-") as tmp, _quiet_converters():
        work, out = Path(tmp) / "model.onnx", Path(tmp) / f"model.{precision}.onnx"
        shutil.copyfile(src, work)  # ModelOpt writes intermediate files next to its input
        if precision in QUANTIZED:
            from modelopt.onnx.quantization import quantize

            quantize(
                str(work), quantize_mode=precision, calibration_data=np.ascontiguousarray(calibration, dtype=np.float32),
                calibration_eps=["cpu"], high_precision_dtype="fp32", dq_only=True, output_path=str(out), log_level="WARNING",
            )
        else:
            from modelopt.onnx.autocast import convert_to_mixed_precision

            onnx.save(convert_to_mixed_precision(str(work), low_precision_type=precision, keep_io_types=True), str(out))
        meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        if meta:  # the preprocessing the fp32 export carries (lotus_deploy.export.metadata) goes along
            from lotus_deploy.export.metadata import set_metadata

            m = onnx.load(str(out))
            set_metadata(m, {**meta, "precision": precision})
            onnx.save(m, str(out))
        onnx.checker.check_model(str(out))
        with atomic_path(dst) as t:
            shutil.copyfile(out, t)
    return Path(dst)


def convert_verified(src: str | Path, dst: str | Path, precision: str, calibration=None) -> dict[str, Any]:
    """:func:`convert`, then check the graph: ``precision`` types inside, fp32 inputs/outputs, every 2:4 weight of ``src`` still 2:4.

    Returns:
        ``{"graph": graph facts, "two_four": {"two_four_layers", "kept"}, "bytes": size of dst}``.

    Raises:
        PrecisionCheckError: another precision or IO type in the graph, or a 2:4 weight lost.
    """
    from lotus_deploy.export.verify import ExportError, two_four_kept

    dst = convert(src, dst, precision, calibration)
    facts = graph_facts(dst)
    if facts["precision"] != precision or set(facts["inputs"].values()) | set(facts["outputs"].values()) != {"FLOAT"}:
        raise PrecisionCheckError(f"{dst.name}: expected a {precision} graph with fp32 inputs/outputs, got {facts['precision']} with {facts['inputs']} -> {facts['outputs']}")
    try:
        kept = two_four_kept(src, dst)
    except ExportError as e:
        raise PrecisionCheckError(str(e)) from e
    return {"graph": facts, "two_four": kept, "bytes": dst.stat().st_size}


# ----------------------------------------------------------------------------- check on eval images


def onnx_runner(path: str | Path, threads: int | None = None) -> tuple[Callable, str]:
    """``(fn(x) -> logits, runtime)`` for an ONNX file on the CPU.

    ONNX Runtime CPU when it has kernels for every node; otherwise (e.g. bf16 Conv) the ONNX
    reference evaluator, ``runtime`` then saying why.
    """
    import numpy as np

    from lotus_deploy.runtime import ort_session

    try:
        sess = ort_session(path, threads=threads)
    except Exception as e:  # noqa: BLE001 — onnxruntime raises its own NotImplemented for missing kernels
        if "NOT_IMPLEMENTED" not in str(e):
            raise
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(str(path))
        why = str(e).split("NOT_IMPLEMENTED :", 1)[-1].strip().split("\n")[0]
        return (lambda x: np.asarray(ref.run(None, {ref.input_names[0]: _numpy(x)})[0], dtype=np.float32)), f"onnx.reference (ONNX Runtime CPU: {why})"
    name = sess.get_inputs()[0].name
    return (lambda x: sess.run(None, {name: _numpy(x)})[0]), "onnxruntime CPU"


def _numpy(x):
    import numpy as np

    return np.ascontiguousarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)


def check_precision(path: str | Path, reference: str | Path, images, labels, precision: str, batch: int = 32,
                    tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Compare the converted ONNX ``path`` with the fp32 ONNX ``reference`` on eval ``images``.

    Args:
        images: ``(N, C, H, W)`` eval images (torch or numpy, preprocessed).
        labels: ``(N,)`` class indices.
        batch: images per run.
        tolerance: default :data:`TOLERANCES` of ``precision``.

    Returns:
        ``precision``, ``runtime``, ``images``, ``top1`` and ``top1_fp32`` (%), ``top1_drop``
        (points), ``top1_agreement`` (fraction), ``max_abs_diff`` (logits), ``max_rel_diff``
        (over the largest |fp32 logit|), ``finite``, ``tolerance``.

    Raises:
        PrecisionCheckError: one line listing every criterion missed (non-finite logits included).
    """
    import numpy as np

    from lotus_deploy.metrics import agreement, top1_loop

    tol = tolerance or TOLERANCES[precision]
    ref_fn, _ = onnx_runner(reference)
    fn, runtime = onnx_runner(path)
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(images), batch)]
    res = top1_loop({"fp32": ref_fn, precision: fn}, batches, keep_logits=True)
    a, b = res["fp32"]["logits"], res[precision]["logits"]
    finite = bool(np.isfinite(b).all())  # (N, classes) logits of the converted model
    agree = agreement(a, b)
    scale = float(np.abs(a).max()) if a.size else math.nan
    out = {
        "precision": precision, "runtime": runtime, "images": res[precision]["images"],
        "top1": res[precision]["top1"], "top1_fp32": res["fp32"]["top1"], "top1_drop": res["fp32"]["top1"] - res[precision]["top1"],
        **agree, "max_rel_diff": agree["max_abs_diff"] / scale if scale > 0 else math.nan,
        "finite": finite, "tolerance": asdict(tol),
    }
    problems = tolerance_problems(out, tol)
    if problems:
        raise PrecisionCheckError(f"{Path(path).name} ({runtime}) vs fp32 on {out['images']} eval images: " + "; ".join(problems))
    return out


def tolerance_problems(m: dict[str, Any], tol: Tolerance) -> list[str]:
    """Every criterion of ``tol`` that the :func:`check_precision` metrics ``m`` miss (NaN misses all), as phrases."""
    problems = []
    if not m["finite"]:
        problems.append("non-finite logits")
    if not m["top1_agreement"] >= tol.min_agreement:  # `not >=` so NaN fails
        problems.append(f"top-1 agreement {100 * m['top1_agreement']:.1f}% < {100 * tol.min_agreement:.1f}%")
    if not m["top1_drop"] <= tol.max_top1_drop:
        problems.append(f"top-1 {m['top1']:.2f}% is {m['top1_drop']:.2f} points below fp32's {m['top1_fp32']:.2f}% (> {tol.max_top1_drop:g})")
    if not m["max_rel_diff"] <= tol.max_rel_diff:
        problems.append(f"max logit difference {m['max_abs_diff']:.3g} is {m['max_rel_diff']:.3g} of the largest fp32 logit (> {tol.max_rel_diff:g})")
    return problems


# ----------------------------------------------------------------------------- the step for a run


def calibration_images(data, n: int, seed: int = 0):
    """``n`` class-balanced, seeded images of the train split with the *eval* transform (no augmentation).

    Args:
        data: a :class:`lotus_deploy.data.DataBundle` (its train subset is respected).

    Returns:
        ``(n, C, H, W)`` float32 torch tensor (fewer when the split is smaller).
    """
    import torch

    from lotus_deploy.data import balanced_subset, build_transform, split_dataset

    ds = split_dataset(data.cfg, True, build_transform(data.spec, False))
    pool = data.subsets.get("train") or list(range(len(ds)))
    targets = list(ds.targets)
    picks = balanced_subset([targets[i] for i in pool], min(n, len(pool)), seed)
    return torch.stack([ds[pool[p]][0] for p in picks]).float()


def precision_for_state(state, onnx_path: str | Path, precision: str | None = None, tolerance: Tolerance | None = None) -> tuple[dict, dict]:
    """The precision step for a run's state: ``model.<precision>.onnx`` next to the fp32 ``onnx_path``, checked.

    Settings come from ``state.recipe.export`` (``precision`` unless given, ``calibration_images``,
    ``precision_images``). Writes ``model.<precision>.json`` (the metrics) next to it.

    Args:
        tolerance: of the check against fp32; default :data:`TOLERANCES` of ``precision``.

    Returns:
        (metrics, artifacts name -> path); ``({}, {})`` for fp32.

    Raises:
        PrecisionUnavailable: the ``precision`` extra is missing.
        PrecisionCheckError: 2:4 lost, or the check against fp32 failed (one line).
    """
    from lotus_deploy.files import write_json

    cfg = state.recipe.export
    precision = check_precision_name(precision or cfg.precision)
    if precision == "fp32":
        return {}, {}
    require_converter(precision)
    onnx_path = Path(onnx_path)
    dst = onnx_path.with_name(f"model.{precision}.onnx")
    calib = None
    if precision in QUANTIZED:
        calib = calibration_images(state.data, cfg.calibration_images, state.recipe.data.subset_seed).numpy()
    verified = convert_verified(onnx_path, dst, precision, calib)
    kept = verified["two_four"]
    images, labels = state.data.eval_batch(cfg.precision_images)
    metrics = {**check_precision(dst, onnx_path, images, labels, precision, tolerance=tolerance), **verified,
               "calibration_images": 0 if calib is None else len(calib)}
    meta = write_json(dst.with_suffix(".json"), metrics)
    state.log.info(
        f"precision: {dst} ({metrics['bytes'] / 1e6:.1f} MB, {metrics['runtime']}): top-1 {metrics['top1']:.2f}% vs fp32 {metrics['top1_fp32']:.2f}%, "
        f"agreement {100 * metrics['top1_agreement']:.1f}%, max|diff| {metrics['max_abs_diff']:.2e} on {metrics['images']} eval images; "
        f"{kept['kept']} 2:4 weight(s) kept"
    )
    return metrics, {f"onnx_{precision}": dst, f"onnx_{precision}_json": meta}
