"""ONNX export: parity with PyTorch, zeros kept in the initializers, dynamic batch, failures."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lotus_deploy.export import onnx_export
from lotus_deploy.export.onnx_export import (
    ExportError,
    compare_with_torch,
    export_checked,
    export_onnx,
    onnx_weight_zeros,
    torch_weight_zeros,
)
from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.magnitude import prune_masks
from lotus_deploy.runtime import ort_session
from lotus_deploy.scope import DEFAULT_SCOPE


@pytest.fixture
def pruned(micro_model):
    """(model, masks): the micro ViT with 50% of its block Linear weights zeroed."""
    masks = prune_masks(micro_model, DEFAULT_SCOPE, 0.5, "global")
    apply_masks_(micro_model, masks)
    return micro_model, masks


@pytest.fixture
def images():
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (N, 3, 32, 32)


def test_parity_and_zero_counts(pruned, images, tmp_path):
    model, masks = pruned
    m = export_checked(model, tmp_path / "m.onnx", images, tolerance=1e-4)
    assert m["max_abs_diff"] < 1e-4
    assert m["top1_agreement"] == 1.0
    assert m["images"] == len(images)
    pruned_zeros = sum(int((~v).sum()) for v in masks.values())
    assert m["torch_weight_zeros"] >= pruned_zeros
    assert m["onnx_weight_zeros"] >= m["torch_weight_zeros"]
    assert m["bytes"] == (tmp_path / "m.onnx").stat().st_size and m["opset"] == 17


def test_initializers_hold_the_pruned_weights_exactly(pruned, images, tmp_path):
    """Every pruned weight is an ONNX initializer, bit for bit (possibly transposed for MatMul)."""
    import onnx
    from onnx import numpy_helper

    model, masks = pruned
    path = export_onnx(model, tmp_path / "m.onnx", images[:1])
    inits = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    params = dict(model.named_parameters())
    for name in masks:
        w = params[name].detach().numpy()
        found = [a for a in inits if a.shape in (w.shape, w.T.shape) and (np.array_equal(a, w) or np.array_equal(a, w.T))]
        assert found, f"{name} not found among the ONNX initializers"
        assert int((found[0] == 0).sum()) == int((w == 0).sum()) >= int((~masks[name]).sum())


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(pruned, images, tmp_path, batch):
    model, _ = pruned
    path = export_onnx(model, tmp_path / "m.onnx", images[:2])  # exported with batch 2
    sess = ort_session(path, threads=1)
    x = images[:batch]
    (got,) = sess.run(["logits"], {"input": x.numpy()})
    assert got.shape == (batch, 10)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("opset", [17, 18])
def test_graph_io_and_opset(micro_model, images, tmp_path, opset):
    import onnx

    path = export_onnx(micro_model, tmp_path / "m.onnx", images[:1], opset=opset)
    g = onnx.load(str(path))
    assert [i.name for i in g.graph.input] == ["input"]
    assert [o.name for o in g.graph.output] == ["logits"]
    dims = g.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp files left


def test_tolerance_too_small_fails_for_the_right_reason(pruned, images, tmp_path, monkeypatch):
    model, _ = pruned
    path = export_onnx(model, tmp_path / "probe.onnx", images[:1])
    diff = compare_with_torch(path, model, images)["max_abs_diff"]
    if diff == 0.0:  # bit-exact here: force a real-looking difference through the comparison
        real = onnx_export.compare_with_torch
        monkeypatch.setattr(onnx_export, "compare_with_torch", lambda *a, **k: {**real(*a, **k), "max_abs_diff": 1e-7})
    with pytest.raises(ExportError, match=r"differs from PyTorch by .* > tolerance 1e-12 on 24 eval images"):
        export_checked(model, tmp_path / "m.onnx", images, tolerance=1e-12)


def test_lost_zeros_fail(pruned, images, tmp_path, monkeypatch):
    model, _ = pruned
    monkeypatch.setattr(onnx_export, "onnx_weight_zeros", lambda path: {"zeros": 0, "weights": 1})
    with pytest.raises(ExportError, match="zeros were lost"):
        export_checked(model, tmp_path / "m.onnx", images)


def test_failed_export_leaves_no_file(micro_model, images, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(micro_model, tmp_path / "m.onnx", images[:1])
    assert list(tmp_path.iterdir()) == []


def test_weight_zero_counters(micro_model, tmp_path, images):
    with torch.no_grad():
        micro_model.head.weight[:3] = 0
    tz = torch_weight_zeros(micro_model)
    assert tz["zeros"] == 3 * micro_model.head.weight.shape[1]
    assert tz["weights"] == sum(p.numel() for p in micro_model.parameters() if p.ndim >= 2)
    oz = onnx_weight_zeros(export_onnx(micro_model, tmp_path / "m.onnx", images[:1]))
    assert oz["zeros"] >= tz["zeros"]


def test_export_stage_in_a_run(tiny_run):
    from lotus_deploy.files import read_json, sha256_file

    manifest = read_json(tiny_run / "manifest.json")
    e = next(e for e in manifest["stages"] if e["kind"] == "export")
    m = e["metrics"]
    assert e["status"] == "done" and "model" not in e["artifacts"]  # export does not change the model
    assert m["max_abs_diff"] <= m["tolerance"] and m["top1_agreement"] == 1.0
    assert m["onnx_weight_zeros"] >= m["torch_weight_zeros"] > 0
    onnx_file = tiny_run / e["artifacts"]["onnx"]["path"]
    assert sha256_file(onnx_file) == e["artifacts"]["onnx"]["sha256"]
    pre = read_json(tiny_run / e["artifacts"]["preprocess"]["path"])
    assert pre["input_size"] == [3, 32, 32] and pre["mean"] == [0.5] * 3 and pre["std"] == [0.5] * 3
    assert pre["input"] == "input" and pre["output"] == "logits" and pre["classes"] == [str(i) for i in range(10)]
    # The file in the run is the baked model: its logits match the final checkpoint's.
    from lotus_deploy.run import Run

    model, masks = Run(tiny_run).load("final")
    assert masks == {}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (got,) = ort_session(onnx_file).run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4


def test_onnx_imports_are_lazy():
    code = (
        "import sys, lotus_deploy.export.onnx_export, lotus_deploy.cli, lotus_deploy.recipe, lotus_deploy.pipeline, "
        "lotus_deploy.bench.run, lotus_deploy.stages\n"
        "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
