"""PyTorch 2:4 semi-structured backend: per-layer checks on the CPU, numerics on a GPU (``gpu``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lotus_deploy import semi_structured_torch as sst
from lotus_deploy.prune.two_four import is_two_four, two_four_masks

GPU_MISSING = sst.unavailable_reason(torch.float16)


def _two_four_(linear: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        linear.weight.mul_(two_four_masks(linear.weight))
    return linear


def _linear(in_f: int, out_f: int, two_four: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    return _two_four_(lin) if two_four else lin


@pytest.mark.parametrize(
    "in_f, out_f, two_four, backend, reason",
    [
        (64, 256, True, "cutlass", None),
        (64, 256, True, "cusparselt", None),
        (64, 256, False, "cusparselt", "not 2:4 along in_features"),
        (40, 64, True, "cusparselt", "in_features 40 is not a multiple of 16"),
        (64, 12, True, "cusparselt", "out_features 12 is not a multiple of 8"),
        (48, 64, True, "cutlass", "not a multiple of the cutlass tile 32x64"),
        (48, 64, True, "cusparselt", None),
        (32, 24, True, "cusparselt", "not a multiple of the cusparselt tile 16x16"),
    ],
    ids=["ok-cutlass", "ok-cusparselt", "dense", "k-not-16", "n-not-8", "cutlass-tile", "cusparselt-48", "cusparselt-rows"],
)
def test_layer_reason(in_f, out_f, two_four, backend, reason):
    lin = _linear(in_f, out_f, two_four)
    got = sst.layer_reason(lin, torch.float16, backend)
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_unavailable_reasons():
    assert "float16 or bfloat16" in sst.unavailable_reason(torch.float32)
    if GPU_MISSING is not None:
        assert "compute capability" in GPU_MISSING
    with pytest.raises(ValueError, match="cusparselt or cutlass"):
        sst.backend_class("dense")


@pytest.mark.skipif(GPU_MISSING is None, reason="a capable GPU is present: the unavailable path is not taken")
def test_conversion_refuses_without_a_gpu(micro_model, tiny_run):
    with pytest.raises(sst.SemiStructuredUnavailable, match="compute capability"):
        sst.to_semi_structured_(micro_model)
    from lotus_deploy.runtime import load

    with pytest.raises(sst.SemiStructuredUnavailable):
        load(tiny_run, semi_structured=True)


# ----------------------------------------------------------------------------- needs a GPU (cc >= 8.0)


def _two_four_model():
    from lotus_deploy.models import build_model
    from lotus_deploy.recipe.base import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lotus_vit_tiny_patch8_32", num_classes=10)).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("blocks."):
            _two_four_(mod)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=f"{GPU_MISSING}")
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sparse_matches_dense_on_gpu(backend, dtype):
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("this torch build has no cuSPARSELt")
    if sst.unavailable_reason(dtype):
        pytest.skip(sst.unavailable_reason(dtype))
    model = _two_four_model()
    dense = copy.deepcopy(model).to("cuda", dtype)
    report = sst.to_semi_structured_(model, dtype=dtype, backend=backend)
    linears = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert report["converted"] == linears and report["skipped"] == {}
    assert all(isinstance(model.get_submodule(n).weight, torch.sparse.SparseSemiStructuredTensor) for n in linears)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=dtype)
    with torch.inference_mode():
        ref, got = dense(x).float(), model(x).float()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert (ref - got).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    assert (ref.argmax(1) == got.argmax(1)).float().mean().item() >= 0.875


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=f"{GPU_MISSING}")
def test_dense_layers_are_skipped_with_reason_on_gpu():
    model = _two_four_model()
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.fill_(1.0)  # dense again
    assert not is_two_four(model.blocks[0].mlp.fc1.weight, axis=1)
    report = sst.to_semi_structured_(model)
    assert "not 2:4" in report["skipped"]["blocks.0.mlp.fc1"]
    assert "blocks.0.mlp.fc1" not in report["converted"] and "blocks.0.mlp.fc2" in report["converted"]


@pytest.mark.gpu
@pytest.mark.skipif(GPU_MISSING is not None, reason=f"{GPU_MISSING}")
def test_runtime_semi_structured_on_gpu(tiny_run):
    """The runtime's PyTorch 2:4 path serves a run; unstructured (not 2:4) layers stay dense, with the reason."""
    import numpy as np

    from lotus_deploy.runtime import load

    p = load(tiny_run, semi_structured=True)
    assert p.details["dtype"] == "float16" and p.details["semi_structured"]["converted"] == []
    assert all("2:4" in why or "tile" in why for why in p.details["semi_structured"]["skipped"].values())
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(p.predict(x), load(tiny_run, device="cpu").predict(x), atol=5e-2)


# ----------------------------------------------------------------------------- benchmarks/gemm_24.py


def _gemm_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_24.py"
    spec = importlib.util.spec_from_file_location("gemm_24", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gemm_benchmark_shapes():
    shapes = _gemm_script().mlp_shapes(197)
    assert len(shapes) == 2 * 2 * 9  # ViT-S/B x fc1/fc2 x batch 1..256
    fc1_s = [s for s in shapes if s["model"] == "vit_s" and s["layer"] == "fc1"]
    assert [s["batch"] for s in fc1_s] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (fc1_s[-1]["M"], fc1_s[-1]["K"], fc1_s[-1]["N"]) == (256 * 197, 384, 1536)
    fc2_b = [s for s in shapes if s["model"] == "vit_b" and s["layer"] == "fc2"][0]
    assert (fc2_b["K"], fc2_b["N"]) == (3072, 768)


@pytest.mark.skipif(GPU_MISSING is None, reason="a capable GPU is present: the benchmark runs instead of refusing")
def test_gemm_benchmark_refuses_without_a_gpu(tmp_path, capsys):
    assert _gemm_script().main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemm_24: cannot run here:") and "compute capability" in err
    assert list(tmp_path.iterdir()) == []
