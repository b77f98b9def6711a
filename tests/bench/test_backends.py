"""lotus_deploy.bench.backends: the registry, skip reasons, and CPU backends built on the runtime's predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lotus_deploy import runtime
from lotus_deploy.bench.backends import BACKENDS, BackendContext, resolve_backends
from lotus_deploy.export.precision import missing_packages
from lotus_deploy.runtime import Predictor

CPU_BACKENDS = ["torch_cpu", "onnxruntime_cpu"]
GPU_BACKENDS = ["torch_cuda_fp32", "torch_cuda_fp16", "torch_cuda_bf16", "torch_compile_cuda_fp16", "torch_2to4_fp16",
                "onnxruntime_cuda", "onnxruntime_tensorrt", "tensorrt"]


def test_every_issue_backend_is_registered():
    assert set(BACKENDS) >= {"torch_cpu", "torch_compile_cpu", *CPU_BACKENDS, *GPU_BACKENDS}


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_cpu_backends_are_available(name):
    assert BACKENDS[name].available() is None and BACKENDS[name].device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the GPU backends may be available")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backends_skip_with_a_reason_without_cuda(name):
    why = BACKENDS[name].available()
    assert isinstance(why, str) and len(why) > 20
    assert any(w in why for w in ("CUDA", "GPU", "tensorrt", "TensorRT")), why
    assert BACKENDS[name].device == "cuda"


def test_resolve_backends_auto_all_and_unknown():
    auto = [b.name for b in resolve_backends(["auto"])]
    assert "torch_cpu" in auto and "onnxruntime_cpu" in auto
    assert "torch_compile_cpu" not in auto and "torch_compile_cuda_fp16" not in auto  # compile is opt-in
    assert [b.name for b in resolve_backends(["all"])] == list(BACKENDS)
    assert [b.name for b in resolve_backends(["onnxruntime_cpu", "auto"])][0] == "onnxruntime_cpu"
    assert len({b.name for b in resolve_backends(["auto", "torch_cpu"])}) == len(auto)  # no repeats
    with pytest.raises(KeyError, match="known: .*torch_cpu"):
        resolve_backends(["nope"])


def test_registering_a_backend_twice_fails():
    with pytest.raises(KeyError, match="already registered"):
        BACKENDS.add("torch_cpu", BACKENDS["torch_cpu"])


@pytest.fixture
def ctx(micro_model, tmp_path):
    """The micro ViT exported to ONNX, one thread, batches 1 and 5."""
    from lotus_deploy.export.onnx_export import export_onnx

    onnx = export_onnx(micro_model, tmp_path / "m.onnx", torch.randn(1, 3, 32, 32))
    return BackendContext(onnx, tmp_path, threads=1, batch_sizes=[1, 5], input_shape=(3, 32, 32))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_cpu_backend_is_a_runtime_predictor_that_matches_the_model(name, micro_model, ctx):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = micro_model(x).numpy()
    p = BACKENDS[name].prepare(micro_model, ctx)
    assert isinstance(p, Predictor) and p.chw == (3, 32, 32)
    assert p.sync is None  # CPU: the forward is done when it returns, timed by the wall clock
    got = p.predict(x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # the split the bench times: stage (copy in), forward (timed), fetch (copy out)
    np.testing.assert_array_equal(p.fetch(p.forward(p.stage(x))), got)


def test_onnxruntime_backend_uses_the_one_session_factory(micro_model, ctx, monkeypatch):
    calls = []
    factory = runtime.ort_session
    monkeypatch.setattr(runtime, "ort_session", lambda *a, **k: (calls.append((a, k)), factory(*a, **k))[1])
    p = BACKENDS["onnxruntime_cpu"].prepare(micro_model, ctx)
    assert len(calls) == 1 and calls[0][1] == {"providers": ["CPUExecutionProvider"], "threads": 1}
    assert p.details["providers"] == ["CPUExecutionProvider"] and p.details["intra_op_threads"] == 1
    assert p.details["allow_spinning"] is False and p.details["io_binding"] is False


PRECISION_BACKENDS = [f"onnxruntime_cpu_{p}" for p in ("fp16", "bf16", "int8", "fp8")] + [f"tensorrt_{p}" for p in ("fp32", "bf16", "int8", "fp8")]


def test_precision_backends_are_registered_opt_in():
    for name in PRECISION_BACKENDS:
        b = BACKENDS[name]
        assert b.precision == name.rsplit("_", 1)[1] and b.family in ("onnxruntime_cpu", "tensorrt") and not b.default and b.needs_onnx
    assert (BACKENDS["tensorrt"].precision, BACKENDS["tensorrt"].family) == ("fp16", "tensorrt")
    assert BACKENDS["onnxruntime_cpu"].family == "onnxruntime_cpu" and BACKENDS["onnxruntime_cpu"].precision == "fp32"
    assert not set(PRECISION_BACKENDS) & {b.name for b in resolve_backends(["auto"])}
    if not torch.cuda.is_available():  # the GPU ones say why they cannot run here
        assert all("TensorRT" in BACKENDS[n].available() for n in PRECISION_BACKENDS if n.startswith("tensorrt"))


@pytest.mark.skipif(bool(missing_packages()), reason="needs the `precision` extra")
@pytest.mark.parametrize("precision, atol", [("fp16", 2e-2), ("int8", 0.5), ("fp8", 0.5)])
def test_onnxruntime_cpu_precision_backend_runs_the_converted_onnx(micro_model, ctx, precision, atol):
    """The ONNX converted by ctx.convert (once per variant), fp32 IO, on ONNX Runtime CPU."""
    from lotus_deploy.export.precision import convert_verified

    made = []

    def convert(p):
        made.append(p)
        dst = ctx.onnx_path.with_name(f"m.{p}.onnx")
        calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
        return dst, convert_verified(ctx.onnx_path, dst, p, calib if p in ("int8", "fp8") else None)

    ctx.convert = convert
    name = f"onnxruntime_cpu_{precision}"
    assert BACKENDS[name].available() is None
    p = BACKENDS[name].prepare(micro_model, ctx)
    assert made == [precision] and p.details["precision"] == precision and p.details["conversion"]["graph"]["precision"] == precision
    assert p.details["onnx"].endswith(f"m.{precision}.onnx") and p.details["providers"] == ["CPUExecutionProvider"]
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = micro_model(x).numpy()
    got = p.predict(x)
    assert got.dtype == np.float32 and got.shape == ref.shape and np.abs(got - ref).max() < atol


def test_precision_backend_without_a_converter_says_so(micro_model, ctx):
    with pytest.raises(RuntimeError, match="no int8 ONNX: this bench cannot convert"):
        BACKENDS["onnxruntime_cpu_int8"].prepare(micro_model, ctx)
    assert ctx.onnx_in("fp32") == (ctx.onnx_path, {})


@pytest.mark.gpu
@pytest.mark.parametrize("name", [
    *(n for n in GPU_BACKENDS if n not in ("torch_2to4_fp16", "onnxruntime_tensorrt", "tensorrt")),
    *(pytest.param(n, marks=pytest.mark.trt) for n in ("onnxruntime_tensorrt", "tensorrt", "tensorrt_fp32")),
])
def test_gpu_backend_matches_the_model(name, micro_model, ctx):
    """Skipped with the backend's own reason where it cannot run (no GPU here). torch_2to4_fp16 needs a
    2:4 model with sparse-kernel shapes: see tests/test_semi_structured_torch.py."""
    why = BACKENDS[name].available()
    if why:
        pytest.skip(why)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = micro_model(x).numpy()
    p = BACKENDS[name].prepare(micro_model, ctx)
    got = p.predict(x)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=5e-2, rtol=5e-2)  # fp16 backends
    np.testing.assert_allclose(p.fetch(p.forward(p.stage(x))), got, atol=1e-3)
    # torch and TensorRT engines queue work on a stream (a sync, CUDA events); ONNX Runtime's run waits
    assert (p.sync is None) == name.startswith("onnxruntime")
