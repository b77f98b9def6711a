"""Benchmark backends: one registered entry per way of running a model.

A backend says whether it can run here (``available()`` returns None or the reason it cannot,
which the report prints) and turns a model into a :class:`Prepared` callable set. The split of
``stage`` (host-to-device copy / input conversion) from ``forward`` (the timed call) lets the
benchmark time the model on inputs already on its device and report copies separately.

Only ``torch_cpu``, ``torch_compile_cpu`` and ``onnxruntime_cpu`` run on the development machines.
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
    """

    onnx_path: Path | None
    work_dir: Path
    threads: int
    batch_sizes: list[int]
    input_shape: tuple[int, int, int]
    two_four_layers: list[str] = field(default_factory=list)
    log: Callable[[str], Any] = print


@dataclass
class Prepared:
    """A model made ready on one backend.

    Attributes:
        stage: CPU fp32 batch ``(B, C, H, W)`` -> the backend's own input (on its device, in its
            dtype); for GPU backends this is the host-to-device copy, timed separately.
        forward: the backend's input -> its raw output; the call whose latency is reported.
        to_logits: raw output -> CPU fp32 logits ``(B, classes)``.
        sync: blocks until queued device work is done (None on CPU).
        cuda_events: time ``forward`` with CUDA events on the current stream instead of the
            wall clock.
        info: what was actually used (providers, dtype, engine file), kept in the results.
    """

    stage: Callable[[torch.Tensor], Any]
    forward: Callable[[Any], Any]
    to_logits: Callable[[Any], torch.Tensor]
    sync: Callable[[], None] | None = None
    cuda_events: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """CPU fp32 batch -> CPU fp32 logits, through this backend (used for accuracy)."""
        return self.to_logits(self.forward(self.stage(x)))


@dataclass
class Backend:
    """A registered backend.

    Attributes:
        needs_onnx: ``prepare`` reads ``ctx.onnx_path``.
        device: ``cpu`` or ``cuda`` (copies are timed separately on ``cuda``).
        default: part of ``auto`` (every default backend that is available here).
    """

    name: str
    needs_onnx: bool
    available: Callable[[], str | None]
    prepare: Callable[[torch.nn.Module, BackendContext], Prepared]
    description: str = ""
    device: str = "cpu"
    default: bool = True


BACKENDS: Registry[Backend] = Registry("bench backend")


def register_backend(name: str, needs_onnx: bool = False, description: str = "", device: str = "cpu", default: bool = True):
    """Class decorator registering a class with static ``available()`` and ``prepare(model, ctx)``."""

    def deco(cls):
        BACKENDS.add(name, Backend(name, needs_onnx, cls.available, cls.prepare, description, device, default))
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


def _torch_cpu_prepared(model: torch.nn.Module) -> Prepared:
    @torch.inference_mode()
    def forward(x):
        return model(x)

    return Prepared(stage=lambda x: x.float(), forward=forward, to_logits=lambda y: y.float())


def _torch_cuda_prepared(model: torch.nn.Module, dtype: torch.dtype, info: dict) -> Prepared:
    """Device-resident inputs; CUDA-event timing of the forward (untested here: no GPU)."""
    dev = torch.device("cuda")

    def stage(x):
        return x.to(dev, dtype)

    @torch.inference_mode()
    def forward(x):
        return model(x)

    return Prepared(
        stage=stage, forward=forward, to_logits=lambda y: y.float().cpu(), sync=torch.cuda.synchronize,
        cuda_events=True, info={"dtype": str(dtype).removeprefix("torch."), "gpu": torch.cuda.get_device_name(), **info},
    )


# ----------------------------------------------------------------------------- PyTorch


@register_backend("torch_cpu", description="PyTorch eager, fp32, CPU (the reference)")
class TorchCPU:
    @staticmethod
    def available() -> str | None:
        return None

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        return _torch_cpu_prepared(model.eval().to("cpu"))


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
    def prepare(model, ctx: BackendContext) -> Prepared:
        compiled = torch.compile(copy.deepcopy(model).eval().to("cpu"))
        p = _torch_cpu_prepared(compiled)
        p.info = {"compile": "inductor default mode"}
        return p


def _register_torch_cuda(name: str, dtype: torch.dtype, needs_bf16: bool = False) -> None:
    class _TorchCUDA:
        @staticmethod
        def available() -> str | None:
            why = _cuda_reason()
            if why is None and needs_bf16 and not torch.cuda.is_bf16_supported():
                why = "this GPU does not support bf16"
            return why

        @staticmethod
        def prepare(model, ctx: BackendContext) -> Prepared:
            m = copy.deepcopy(model).eval().to("cuda", dtype)
            return _torch_cuda_prepared(m, dtype, {})

    register_backend(name, description=f"PyTorch eager, {str(dtype)[6:]}, CUDA (untested here)", device="cuda")(_TorchCUDA)


_register_torch_cuda("torch_cuda_fp32", torch.float32)
_register_torch_cuda("torch_cuda_fp16", torch.float16)
_register_torch_cuda("torch_cuda_bf16", torch.bfloat16, needs_bf16=True)


@register_backend("torch_compile_cuda_fp16", description="torch.compile (inductor), fp16, CUDA; off by default (untested here)", device="cuda", default=False)
class TorchCompileCUDA:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason()

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        m = torch.compile(copy.deepcopy(model).eval().to("cuda", torch.float16))
        return _torch_cuda_prepared(m, torch.float16, {"compile": "inductor default mode"})


@register_backend(
    "torch_2to4_fp16",
    description="PyTorch 2:4 semi-structured sparse Linears (to_sparse_semi_structured), fp16, CUDA cc >= 8.0 (untested here)",
    device="cuda",
)
class Torch2to4:
    """The 2:4 Linear weights converted by :func:`lotus_deploy.semi_structured_torch.to_semi_structured_`
    (the rest stays dense fp16). Compare with ``torch_cuda_fp16``, the same model dense. A variant
    with no convertible layer fails with the per-layer reasons. Untested here (no GPU).
    """

    @staticmethod
    def available() -> str | None:
        try:
            from lotus_deploy.semi_structured_torch import unavailable_reason
        except ImportError as e:
            return f"lotus_deploy.semi_structured_torch cannot be imported ({e})"
        return unavailable_reason(torch.float16)

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        from lotus_deploy.semi_structured_torch import to_semi_structured_

        m = copy.deepcopy(model).eval()
        report = to_semi_structured_(m, dtype=torch.float16)
        if not report["converted"]:
            reasons = sorted(set(report["skipped"].values()))
            raise RuntimeError(f"no Linear could be made semi-structured ({'; '.join(reasons)[:300]})")
        return _torch_cuda_prepared(m, torch.float16, {"semi_structured": report})


# ----------------------------------------------------------------------------- ONNX Runtime


@register_backend("onnxruntime_cpu", needs_onnx=True, description="ONNX Runtime, CPUExecutionProvider, fp32")
class OrtCPU:
    @staticmethod
    def available() -> str | None:
        return _ort_provider_reason("CPUExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        from lotus_deploy.export.onnx_export import INPUT_NAME, OUTPUT_NAME

        sess = ort_cpu_session(ctx.onnx_path, ctx.threads)

        def forward(x):
            return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

        return Prepared(
            stage=lambda x: x.float().contiguous().numpy(), forward=forward, to_logits=torch.from_numpy,
            info={"providers": sess.get_providers(), "intra_op_threads": ctx.threads, "allow_spinning": False},
        )


def ort_cpu_session(path, threads: int):
    """ONNX Runtime CPU session, all graph optimizations, ``threads`` intra-op threads, one inter-op
    thread, and **no spinning**: idle intra-op threads otherwise busy-wait after each run and steal
    the cores from whatever runs next (the other arms of an interleaved benchmark)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_gpu_prepared(ctx: BackendContext, providers: list, want: str) -> Prepared:
    """An ONNX Runtime GPU session with IO binding: input copied to the GPU in ``stage``.

    ``run_with_iobinding`` synchronizes the execution provider's stream before it returns (ONNX
    Runtime's default), so the wall clock times the forward. Untested here (no GPU).
    """
    import onnxruntime as ort

    from lotus_deploy.export.onnx_export import INPUT_NAME, OUTPUT_NAME, ort_session

    sess = ort_session(ctx.onnx_path, providers=providers, threads=ctx.threads)
    used = sess.get_providers()
    if not used or used[0] != want:
        raise RuntimeError(f"ONNX Runtime did not use {want} (session providers: {used})")

    def stage(x):
        binding = sess.io_binding()
        binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x.float().contiguous().numpy(), "cuda", 0))
        binding.bind_output(OUTPUT_NAME, "cuda", 0)
        return binding

    def forward(binding):
        sess.run_with_iobinding(binding)
        return binding

    def to_logits(binding):
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).float()

    return Prepared(stage=stage, forward=forward, to_logits=to_logits, info={"providers": used})


@register_backend("onnxruntime_cuda", needs_onnx=True, description="ONNX Runtime, CUDAExecutionProvider, fp32, IO binding (untested here)", device="cuda")
class OrtCUDA:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason() or _ort_provider_reason("CUDAExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        return _ort_gpu_prepared(ctx, ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider")


def _shape(batch: int, chw: tuple[int, int, int]) -> str:
    return "x".join(str(d) for d in (batch, *chw))


@register_backend(
    "onnxruntime_tensorrt", needs_onnx=True,
    description="ONNX Runtime, TensorrtExecutionProvider, fp16, sparsity enabled, engine cache (untested here)", device="cuda",
)
class OrtTensorRT:
    @staticmethod
    def available() -> str | None:
        return _cuda_reason() or _ort_provider_reason("TensorrtExecutionProvider")

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
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
        return _ort_gpu_prepared(ctx, [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"], "TensorrtExecutionProvider")


# ----------------------------------------------------------------------------- TensorRT engine


@register_backend(
    "tensorrt", needs_onnx=True,
    description="TensorRT engine built by lotus_deploy.trt (fp16, sparse weights when 2:4 layers exist), execute_async_v3 (untested here)",
    device="cuda",
)
class TensorRTEngine:
    """Builds the variant's engine with :func:`lotus_deploy.trt.build_engine` (profile over the
    bench batch sizes, a timing cache shared by the variants) and runs it through
    :class:`lotus_deploy.trt.TensorRTSession`'s context on device-resident torch buffers, so that
    CUDA events time the execution alone. Untested here (no GPU, no TensorRT).
    """

    @staticmethod
    def available() -> str | None:
        try:
            from lotus_deploy.export.trt import unavailable_reason
        except ImportError as e:
            return f"lotus_deploy.trt cannot be imported ({e})"
        return unavailable_reason()

    @staticmethod
    def prepare(model, ctx: BackendContext) -> Prepared:
        import numpy as np

        from lotus_deploy.export.trt import BuildSpec, TensorRTSession, build_engine

        hi = max(ctx.batch_sizes)
        spec = BuildSpec(
            precision="fp16", sparse=bool(ctx.two_four_layers), min_batch=1, opt_batch=hi, max_batch=hi,
            timing_cache=ctx.work_dir.parent / "trt_timing.cache",
        )
        built = build_engine(ctx.onnx_path, ctx.work_dir / "model.plan", spec, two_four_layers=ctx.two_four_layers, log=ctx.log)
        sess = TensorRTSession(built.engine)
        trt = sess._trt
        as_torch = lambda dt: torch.from_numpy(np.empty(0, dtype=trt.nptype(dt))).dtype  # noqa: E731
        in_dtype = as_torch(sess.engine.get_tensor_dtype(sess.input_name))
        out_dtype = as_torch(sess.engine.get_tensor_dtype(sess.output_name))

        def stage(x):
            return x.to("cuda", in_dtype).contiguous()

        def forward(x):
            sess.context.set_input_shape(sess.input_name, tuple(x.shape))
            y = torch.empty(tuple(sess.context.get_tensor_shape(sess.output_name)), dtype=out_dtype, device="cuda")
            sess.context.set_tensor_address(sess.input_name, x.data_ptr())
            sess.context.set_tensor_address(sess.output_name, y.data_ptr())
            if not sess.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"TensorRT execution of {built.engine} failed")
            return y

        return Prepared(
            stage=stage, forward=forward, to_logits=lambda y: y.float().cpu(), sync=torch.cuda.synchronize,
            cuda_events=True, info={"engine": str(built.engine), "engine_bytes": built.engine.stat().st_size, **built.info},
        )


__all__ = ["BACKENDS", "Backend", "BackendContext", "Prepared", "register_backend", "resolve_backends"]
