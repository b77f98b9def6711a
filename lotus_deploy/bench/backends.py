"""Benchmark backends: one registered entry per way of running a model.

A backend says whether it can run here (``available()`` returns None or the reason it cannot,
which the report prints) and turns a model into a :class:`lotus_deploy.runtime.Predictor`, the
same object ``lotus predict`` serves with. The predictor's split of ``stage`` (host-to-device
copy / input conversion), ``forward`` (the timed call, output left on the device) and ``fetch``
(device-to-host copy) lets the benchmark time the model on inputs already on its device and
report the copies separately; its ``sync`` (None on CPU and for ONNX Runtime, whose runs wait
for their stream) says that the forward is asynchronous and is timed with CUDA events.

Precisions: a backend has a ``precision`` and a ``family`` (the same runtime in fp32 and other
precisions). ``onnxruntime_cpu_fp16`` / ``_bf16`` / ``_int8`` / ``_fp8`` run the variant's ONNX
converted by the export's precision step (:func:`lotus_deploy.export.precision.convert_verified`:
ModelOpt AutoCast or Q/DQ calibrated on ``export.calibration_images`` train images, graph types
and 2:4 checked) on ONNX Runtime CPU; ``tensorrt_<precision>`` build an engine from the ONNX of
that precision as the ``engine`` stage does (:func:`lotus_deploy.export.trt.source_precision`).
They are not in ``auto`` (each conversion takes seconds): name them. ONNX Runtime has no CPU
kernels for bf16 Conv: ``onnxruntime_cpu_bf16`` fails with that reason, recorded.

Only ``torch_cpu``, ``torch_compile_cpu`` and the ``onnxruntime_cpu`` family run on the development machines.
Every GPU path (PyTorch CUDA, PyTorch 2:4 semi-structured, ONNX Runtime CUDA and TensorRT
execution providers, TensorRT engines) is written against the documented APIs of torch,
onnxruntime-gpu and tensorrt but is **untested here** (no GPU); each is skipped with its reason
when unavailable. Heavy and optional imports live inside the functions.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lotus_deploy.registry import Registry
from lotus_deploy.runtime import Predictor, load_engine, load_onnx, torch_predictor


@dataclass
class BackendContext:
    """What a backend may need besides the model.

    Attributes:
        onnx_path: the variant's fp32 ONNX file (exported when a selected backend ``needs_onnx``).
        work_dir: scratch folder of this variant (engines, caches).
        threads: CPU threads (torch intra-op, ONNX Runtime intra-op).
        batch_sizes: the benchmark's batch sizes (TensorRT profiles cover them and the eval batch).
        input_shape: ``(C, H, W)`` of one image.
        two_four_layers: Linear layers of the model that are 2:4 along ``in_features``.
        log: where backends report what they did (engine builds).
        convert: precision -> ``(path, facts)`` of the variant's ONNX converted to it and checked
            (made once per variant and shared by the backends; None: no conversion here).
    """

    onnx_path: Path | None
    work_dir: Path
    threads: int
    batch_sizes: list[int]
    input_shape: tuple[int, int, int]
    two_four_layers: list[str] = field(default_factory=list)
    log: Callable[[str], Any] = print
    convert: Callable[[str], tuple[Path, dict]] | None = None

    def onnx_in(self, precision: str) -> tuple[Path, dict]:
        """``(path, conversion facts)`` of the variant's ONNX in ``precision`` (fp32: the export itself)."""
        if precision == "fp32":
            return self.onnx_path, {}
        if self.convert is None:
            raise RuntimeError(f"no {precision} ONNX: this bench cannot convert (BackendContext.convert is None)")
        return self.convert(precision)


@dataclass
class Backend:
    """A registered backend.

    Attributes:
        needs_onnx: ``prepare`` reads ``ctx.onnx_path``.
        prepare: ``(model, ctx) -> Predictor``; what it used (providers, dtype, engine file) is in
            the predictor's ``details``, kept in the results.
        device: ``cpu`` or ``cuda`` (copies are timed separately on ``cuda``).
        default: part of ``auto`` (every default backend that is available here).
        precision: what the model computes in (fp32, fp16, bf16, int8, fp8).
        family: the runtime whose precisions are compared side by side in the report (default: the name).
    """

    name: str
    needs_onnx: bool
    available: Callable[[], str | None]
    prepare: Callable[[torch.nn.Module, BackendContext], Predictor]
    description: str = ""
    device: str = "cpu"
    default: bool = True
    precision: str = "fp32"
    family: str = ""

    def __post_init__(self) -> None:
        self.family = self.family or self.name


BACKENDS: Registry[Backend] = Registry("bench backend")


def register_backend(name: str, needs_onnx: bool = False, description: str = "", device: str = "cpu", default: bool = True,
                     precision: str = "fp32", family: str = ""):
    """Class decorator registering a class with static ``available()`` and ``prepare(model, ctx)``."""

    def deco(cls):
        BACKENDS.add(name, Backend(name, needs_onnx, cls.available, cls.prepare, description, device, default, precision, family))
        return cls

    return deco


def resolve_backends(names: list[str]) -> list[Backend]:
    """Backend names -> backends, in order, without repeats.

    ``auto`` expands to every default backend, ``all`` to every registered one (unavailable ones
    are then skipped with their reason by the benchmark).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    out: list[Backend] = []
    for n in names:
        group = [b for b in BACKENDS.values() if b.default] if n == "auto" else list(BACKENDS.values()) if n == "all" else [BACKENDS[n]]
        out += [b for b in group if b not in out]
    return out


# ----------------------------------------------------------------------------- helpers


def _cuda_reason(min_capability: tuple[int, int] | None = None) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    if min_capability and torch.cuda.get_device_capability() < min_capability:
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        return f"needs compute capability >= {'.'.join(map(str, min_capability))}, this GPU has {cc}"
    return None


def _ort_provider_reason(provider: str) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime is not installed ({e}); pip install onnxruntime"
    if provider not in ort.get_available_providers():
        return (
            f"{provider} is not in this onnxruntime build (has {', '.join(ort.get_available_providers())}); "
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
        )
    return None


def _on_gpu(p: Predictor, **details) -> Predictor:
    """``p`` with the GPU's name and ``details`` added to its details."""
    p.details.update(gpu=torch.cuda.get_device_name(), **details)
    return p


# ----------------------------------------------------------------------------- PyTorch


@register_backend("torch_cpu", description="PyTorch eager, fp32, CPU (the reference)")
class TorchCPU:
    @staticmethod
    def available() -> str | None:
        return None

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        return torch_predictor(model, "cpu", "fp32", chw=ctx.input_shape)


@register_backend("torch_compile_cpu", description="torch.compile (inductor), fp32, CPU; off by default (compiles per shape)", default=False)
class TorchCompileCPU:
    @staticmethod
    def available() -> str | None:
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return "torch.compile's CPU backend (inductor) needs a C++ compiler on PATH"
        return None

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        p = torch_predictor(torch.compile(copy.deepcopy(model).eval().to("cpu")), "cpu", "fp32", chw=ctx.input_shape)
        p.details["compile"] = "inductor default mode"
        return p


def _register_torch_cuda(name: str, dtype: str, needs_bf16: bool = False) -> None:
    class _TorchCUDA:
        @staticmethod
        def available() -> str | None:
            why = _cuda_reason()
            if why is None and needs_bf16 and not torch.cuda.is_bf16_supported():
                why = "this GPU does not support bf16"
            return why

        @staticmethod
        def prepare(model, ctx: BackendContext) -> Predictor:
            return _on_gpu(torch_predictor(copy.deepcopy(model), "cuda", dtype, chw=ctx.input_shape))

    register_backend(name, description=f"PyTorch eager, {dtype}, CUDA (untested here)", device="cuda", precision=dtype, family="torch_cuda")(_TorchCUDA)


_register_torch_cuda("torch_cuda_fp32", "fp32")
_register_torch_cuda("torch_cuda_fp16", "fp16")
_register_torch_cuda("torch_cuda_bf16", "bf16", needs_bf16=True)


@register_backend("torch_compile_cuda_fp16", description="torch.compile (inductor), fp16, CUDA; off by default (untested here)", device="cuda", default=False,
                  precision="fp16")
class TorchCompileCUDA:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason()

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        m = torch.compile(copy.deepcopy(model).eval().to("cuda", torch.float16))
        return _on_gpu(torch_predictor(m, "cuda", "fp16", chw=ctx.input_shape), compile="inductor default mode")


@register_backend(
    "torch_2to4_fp16",
    description="PyTorch 2:4 semi-structured sparse Linears (to_sparse_semi_structured), fp16, CUDA cc >= 8.0 (untested here)",
    device="cuda", precision="fp16",
)
class Torch2to4:
    """The 2:4 Linear weights converted by :func:`lotus_deploy.semi_structured_torch.to_semi_structured_`
    (the rest stays dense fp16; :func:`lotus_deploy.runtime.torch_predictor` with
    ``semi_structured``). Compare with ``torch_cuda_fp16``, the same model dense. A variant with
    no convertible layer fails with the per-layer reasons. Untested here (no GPU).
    """

    @staticmethod
    def available() -> str | None:
        try:
            from lotus_deploy.semi_structured_torch import unavailable_reason
        except ImportError as e:
            return f"lotus_deploy.semi_structured_torch cannot be imported ({e})"
        return unavailable_reason(torch.float16)

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        p = torch_predictor(copy.deepcopy(model), dtype="fp16", semi_structured=True, chw=ctx.input_shape)
        report = p.details["semi_structured"]
        if not report["converted"]:
            reasons = sorted(set(report["skipped"].values()))
            raise RuntimeError(f"no Linear could be made semi-structured ({'; '.join(reasons)[:300]})")
        return _on_gpu(p)


# ----------------------------------------------------------------------------- ONNX Runtime


@register_backend("onnxruntime_cpu", needs_onnx=True, description="ONNX Runtime, CPUExecutionProvider, fp32")
class OrtCPU:
    @staticmethod
    def available() -> str | None:
        return _ort_provider_reason("CPUExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        return load_onnx(ctx.onnx_path, ["CPUExecutionProvider"], ctx.threads)


def _converter_reason(precision: str) -> str | None:
    from lotus_deploy.export.precision import INSTALL_HINT, missing_packages

    missing = missing_packages()
    return f"the {precision} ONNX needs {', '.join(missing)}, not installed: {INSTALL_HINT}" if missing else None


def _register_ort_cpu_precision(precision: str) -> None:
    class _OrtCPUPrecision:
        @staticmethod
        def available() -> str | None:
            return _ort_provider_reason("CPUExecutionProvider") or _converter_reason(precision)

        @staticmethod
        def prepare(model, ctx: BackendContext) -> Predictor:
            path, facts = ctx.onnx_in(precision)
            p = load_onnx(path, ["CPUExecutionProvider"], ctx.threads)
            p.details.update(precision=precision, onnx=str(path), conversion=facts)
            return p

    how = "Q/DQ, calibrated" if precision in ("int8", "fp8") else "AutoCast, fp32 IO"
    register_backend(
        f"onnxruntime_cpu_{precision}", needs_onnx=True, default=False, precision=precision, family="onnxruntime_cpu",
        description=f"ONNX Runtime, CPUExecutionProvider, the ONNX converted to {precision} by ModelOpt ({how}); needs the `precision` extra",
    )(_OrtCPUPrecision)


for _p in ("fp16", "bf16", "int8", "fp8"):
    _register_ort_cpu_precision(_p)


def _ort_gpu(ctx: BackendContext, providers: list, want: str) -> Predictor:
    """An ONNX Runtime GPU predictor with IO binding (input copied to the GPU in ``stage``).

    ONNX Runtime falls back to the next provider when one fails to start: a session whose first
    provider is not ``want`` raises instead of measuring another backend. Untested here (no GPU).
    """
    p = load_onnx(ctx.onnx_path, providers, ctx.threads, io_binding=True)
    used = p.details["providers"]
    if not used or used[0] != want:
        raise RuntimeError(f"ONNX Runtime did not use {want} (session providers: {used})")
    return p


@register_backend("onnxruntime_cuda", needs_onnx=True, description="ONNX Runtime, CUDAExecutionProvider, fp32, IO binding (untested here)", device="cuda",
                  family="onnxruntime_cuda")
class OrtCUDA:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason() or _ort_provider_reason("CUDAExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        return _ort_gpu(ctx, ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider")


def _shape(batch: int, chw: tuple[int, int, int]) -> str:
    return "x".join(str(d) for d in (batch, *chw))


@register_backend(
    "onnxruntime_tensorrt", needs_onnx=True,
    description="ONNX Runtime, TensorrtExecutionProvider, fp16, sparsity enabled, engine cache (untested here)", device="cuda", precision="fp16",
)
class OrtTensorRT:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason() or _ort_provider_reason("TensorrtExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Predictor:
        from lotus_deploy.export.onnx_export import INPUT_NAME

        cache = ctx.work_dir / "ort_trt_cache"
        cache.mkdir(parents=True, exist_ok=True)
        lo, hi = min(ctx.batch_sizes), max(ctx.batch_sizes)
        opts = {
            "trt_fp16_enable": True,
            "trt_sparsity_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT_NAME}:{_shape(lo, ctx.input_shape)}",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{_shape(hi, ctx.input_shape)}",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{_shape(hi, ctx.input_shape)}",
        }
        return _ort_gpu(ctx, [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"], "TensorrtExecutionProvider")


# ----------------------------------------------------------------------------- TensorRT engine


class _TensorRTEngine:
    """Builds the variant's engine with :func:`lotus_deploy.export.trt.build_engine` (profile over
    the bench batch sizes, a timing cache shared by the variants) from the ONNX that the engine
    stage would build this precision from (:func:`lotus_deploy.export.trt.source_precision`: the
    converted one on TensorRT 11) and serves it with :func:`lotus_deploy.runtime.load_engine`:
    device-resident torch buffers, execution queued on the current stream, so that CUDA events
    time the execution alone. The predictor's details hold the sidecar (TensorRT version,
    precision built). Untested here (no GPU, no TensorRT).
    """

    precision = "fp16"

    @classmethod
    def available(cls) -> str | None:
        try:
            from lotus_deploy.export.trt import (
                installed_major,
                source_precision,
                unavailable_reason,
            )
        except ImportError as e:
            return f"lotus_deploy.export.trt cannot be imported ({e})"
        why = unavailable_reason()
        if why is None and source_precision(installed_major(), cls.precision) != "fp32":
            why = _converter_reason(cls.precision)
        return why

    @classmethod
    def prepare(cls, model, ctx: BackendContext) -> Predictor:
        from lotus_deploy.export.trt import (
            BuildSpec,
            build_engine,
            installed_major,
            source_precision,
        )

        hi = max(ctx.batch_sizes)
        path, facts = ctx.onnx_in(source_precision(installed_major(), cls.precision))
        spec = BuildSpec(
            precision=cls.precision, sparse=bool(ctx.two_four_layers), min_batch=1, opt_batch=hi, max_batch=hi,
            timing_cache=ctx.work_dir.parent / "trt_timing.cache",
        )
        built = build_engine(path, ctx.work_dir / f"model.{cls.precision}.plan", spec, two_four_layers=ctx.two_four_layers, log=ctx.log,
                             script_name=f"trtexec.{cls.precision}.sh")
        p = load_engine(built.path)
        p.details.update({**built.info, "engine": str(built.path), "engine_bytes": built.path.stat().st_size, "conversion": facts})
        return p


def _register_tensorrt(name: str, precision: str, default: bool) -> None:
    cls = type(f"TensorRT_{precision}", (_TensorRTEngine,), {"precision": precision})
    register_backend(
        name, needs_onnx=True, device="cuda", default=default, precision=precision, family="tensorrt",
        description=f"TensorRT engine built by lotus_deploy.export.trt, {precision} (strongly typed from the {precision} ONNX on TensorRT 11), "
                    "sparse weights when 2:4 layers exist, execute_async_v3 (untested here)",
    )(cls)


_register_tensorrt("tensorrt", "fp16", default=True)
for _p in ("fp32", "bf16", "int8", "fp8"):
    _register_tensorrt(f"tensorrt_{_p}", _p, default=False)
del _p


__all__ = ["BACKENDS", "Backend", "BackendContext", "register_backend", "resolve_backends"]
