"""Serving runtime: ONNX Runtime (CPU) and PyTorch predictors agree with the model they serve; the one
ONNX Runtime session factory; the stage / forward / fetch split a benchmark times."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lotus_deploy import runtime
from lotus_deploy.errors import InputError
from lotus_deploy.runtime import Predictor, compare, load


@pytest.fixture(scope="module")
def served(tiny_run):
    """The run's final model (masks applied), its eval images and raw eval images (uint8 HxW)."""
    from lotus_deploy.data import build_data
    from lotus_deploy.masks import apply_masks_
    from lotus_deploy.models import input_spec
    from lotus_deploy.run import Run

    run = Run(tiny_run)
    model, masks = run.load("final")
    apply_masks_(model, masks)
    data = build_data(run.recipe.data, input_spec(model))
    x, y = data.eval_batch(20)
    raw = [data.eval.dataset.images[i] for i in data.eval.indices[:20]]  # (8, 8) uint8 digits
    with torch.no_grad():
        ref = model(x).numpy()
    return {"run": tiny_run, "model": model, "x": x, "y": y, "raw": raw, "ref": ref, "data": data}


def _artifact(served, kind):
    run = served["run"]
    return {"onnx": run / "export" / "model.onnx", "run_dir": run, "checkpoint": run / "stages" / "04_bake" / "model.safetensors"}[kind]


@pytest.mark.parametrize("kind", ["onnx", "run_dir", "checkpoint"])
def test_predict_matches_the_model(served, kind):
    p = load(_artifact(served, kind), device="cpu")
    assert p.kind == ("onnxruntime" if kind == "onnx" else "torch")
    logits = p.predict(served["x"])
    assert logits.dtype == np.float32 and logits.shape == served["ref"].shape
    np.testing.assert_allclose(logits, served["ref"], atol=1e-4)
    assert (logits.argmax(1) == served["ref"].argmax(1)).all()
    # numpy input gives the same answer as torch input
    np.testing.assert_array_equal(p.predict(served["x"].numpy()), logits)


def test_onnx_predictor_uses_cpu_provider_here(served):
    p = load(_artifact(served, "onnx"))
    assert p.details["providers"][-1] == "CPUExecutionProvider"
    assert runtime.ort_providers()[-1] == "CPUExecutionProvider"
    with pytest.raises(InputError, match="not available"):
        runtime.ort_providers(["NoSuchExecutionProvider"])


@pytest.mark.parametrize("kind", ["onnx", "run_dir"])
def test_stage_forward_fetch_is_predict(served, kind):
    """The three steps a benchmark times separately give exactly what predict gives."""
    p = load(_artifact(served, kind), device="cpu")
    x = served["x"]
    assert p.sync is None  # CPU: forward is done when it returns
    np.testing.assert_array_equal(p.fetch(p.forward(p.stage(x))), p.predict(x))


def test_one_onnx_runtime_session_factory():
    """Every ONNX Runtime session of the package comes from runtime.ort_session."""
    from conftest import ROOT

    makers = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "lotus_deploy").rglob("*.py") if "InferenceSession(" in f.read_text())
    assert makers == ["lotus_deploy/runtime.py"]


def test_ort_session_settings(served):
    import onnxruntime as ort

    sess = runtime.ort_session(_artifact(served, "onnx"), threads=1)
    so = sess.get_session_options()
    assert sess.get_providers() == ["CPUExecutionProvider"]  # CPU unless asked otherwise
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("providers", [["NoSuchExecutionProvider"], [("NoSuchExecutionProvider", {"x": 1}), "CPUExecutionProvider"]],
                         ids=["name", "name-with-options"])
def test_ort_session_refuses_unavailable_providers(served, providers):
    with pytest.raises(InputError, match=r"\['NoSuchExecutionProvider'\] are not available"):
        runtime.ort_session(_artifact(served, "onnx"), providers)


def test_torch_predictor_on_a_model_in_memory(micro_model):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = micro_model(x).numpy()
    p = runtime.torch_predictor(micro_model, "cpu", "fp32")
    assert p.kind == "torch" and p.path is None and p.chw == (3, 32, 32)
    assert p.details == {"device": "cpu", "dtype": "float32"} and p.sync is None
    assert isinstance(p.stage(x), torch.Tensor)  # the model's own input: no copy on CPU
    np.testing.assert_allclose(p.predict(x), ref, atol=1e-5)


@pytest.mark.parametrize("dtype, semi, match", [("fp64", False, "fp32, fp16 or bf16"), ("fp32", True, "need dtype fp16 or bf16")],
                         ids=["unknown-dtype", "semi-structured-fp32"])
def test_torch_predictor_refuses_bad_dtypes(micro_model, dtype, semi, match):
    with pytest.raises(InputError, match=match):
        runtime.torch_predictor(micro_model, "cpu", dtype, semi_structured=semi)


def test_large_batches_are_split(served):
    p = load(_artifact(served, "onnx"))
    full = p.predict(served["x"])
    calls = []
    forward = p._forward
    p._forward = lambda x: (calls.append(len(x)), forward(x))[1]
    p.max_batch = 6
    np.testing.assert_allclose(p.predict(served["x"]), full, atol=1e-6)
    assert calls == [6, 6, 6, 2]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x: x.permute(0, 2, 3, 1).contiguous(), "channels last"),
        (lambda x: x[0], "add a batch axis"),
        (lambda x: x[:, :, :16, :16], r"expected a batch of shape \(B, 3, 32, 32\)"),
        (lambda x: (x * 255).to(torch.uint8), "dtype uint8"),
        (lambda x: x.tolist(), "numpy array or torch tensor"),
        (lambda x: x[:0], "empty batch"),
    ],
    ids=["nhwc", "no-batch-axis", "wrong-size", "uint8", "list", "empty"],
)
def test_wrong_inputs_get_a_clear_error(served, make, match):
    p = load(_artifact(served, "onnx"))
    with pytest.raises(InputError, match=match):
        p.predict(make(served["x"]))


@pytest.mark.parametrize("as_", ["array", "pil", "path"])
def test_classify_applies_the_saved_preprocessing(served, tmp_path, as_):
    """Raw 8x8 digits through preprocess.json give the model's answer on the eval pipeline's tensors."""
    from PIL import Image

    raw = served["raw"][:8]
    images = {"array": raw, "pil": [Image.fromarray(a) for a in raw], "path": []}[as_]
    if as_ == "path":
        for i, a in enumerate(raw):
            Image.fromarray(a).save(tmp_path / f"{i}.png")
            images.append(tmp_path / f"{i}.png")
    p = load(_artifact(served, "onnx"))
    top = p.classify(images, top_k=3)
    assert len(top) == 8 and all(len(t) == 3 for t in top)
    ref = served["ref"][:8]
    assert [t[0]["index"] for t in top] == ref.argmax(1).tolist()
    for t, r in zip(top, ref):
        probs = [e["prob"] for e in t]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert abs(t[0]["logit"] - r.max()) < 1e-4


def test_classify_uses_class_names_and_needs_preprocessing(served, tmp_path):
    src = _artifact(served, "onnx")
    shutil.copy(src, tmp_path / "model.onnx")
    with pytest.raises(InputError, match="no saved preprocessing"):
        load(tmp_path / "model.onnx").classify(served["raw"][:1])
    pre = json.loads((src.parent / "preprocess.json").read_text())
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (tmp_path / "preprocess.json").write_text(json.dumps({**pre, "classes": names}))
    top = load(tmp_path / "model.onnx").classify(served["raw"][:4], top_k=20)
    assert all(len(t) == 10 for t in top)  # top_k is capped at the number of classes
    assert [t[0]["label"] for t in top] == [names[i] for i in served["ref"][:4].argmax(1)]


def test_compare_onnxruntime_with_pytorch(served):
    loader = served["data"].eval_loader(batch_size=16)
    out = compare(load(_artifact(served, "onnx")), load(_artifact(served, "run_dir"), device="cpu"), loader)
    assert out["images"] == len(served["data"].eval_dataset())
    assert out["top1_agreement"] == 1.0 and out["max_abs_diff"] < 1e-4
    assert out["a"]["top1"] == out["b"]["top1"]


def test_load_errors(served, tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.onnx")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="cannot serve"):
        load(tmp_path / "notes.txt")
    shutil.copy(_artifact(served, "checkpoint"), tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="not inside a lotus run directory"):
        load(tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="not a lotus run directory"):
        load(tmp_path)


def test_predictor_is_a_plain_callable_wrapper():
    """The interface does not depend on a backend: any (B, C, H, W) -> logits function serves."""
    p = Predictor("custom", "x", lambda x: x.reshape(len(x), -1)[:, :5], (1, 2, 3), max_batch=None, preprocess=None)
    out = p.predict(np.arange(12, dtype=np.float64).reshape(2, 1, 2, 3))
    assert out.dtype == np.float32 and out.shape == (2, 5)


def test_cli_predict(served, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from lotus_deploy.cli import main

    paths = []
    for i, a in enumerate(served["raw"][:2]):
        Image.fromarray(a).save(tmp_path / f"d{i}.png")
        paths.append(str(tmp_path / f"d{i}.png"))
    res = CliRunner().invoke(main, ["predict", str(_artifact(served, "onnx")), *paths, "--top-k", "3"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 2 and all(len(ln.split(": ", 1)[1].split("  ")) == 3 for ln in lines)
    assert lines[0].split(": ")[1].split()[0] == str(served["ref"][0].argmax())
    res = CliRunner().invoke(main, ["predict", str(_artifact(served, "onnx")), paths[0], "--json"])
    assert res.exit_code == 0 and len(json.loads(res.output)["top"]) == 5
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    res = CliRunner().invoke(main, ["predict", str(_artifact(served, "onnx")), str(bad)])
    assert res.exit_code == 2 and "error:" in res.output
