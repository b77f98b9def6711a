"""The export's precision step: fp16/bf16/INT8/FP8 ONNX from the fp32 ONNX, checked on the CPU.

Conversions need the ``precision`` extra (ModelOpt and the converters it imports); without it
those tests are skipped with the reason, and the missing-package path (exit 2, one line naming
the extra) is tested either way.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lotus_deploy.export import precision as prec
from lotus_deploy.export.onnx_export import ExportError, export_onnx
from lotus_deploy.export.precision import (
    TOLERANCES,
    PrecisionCheckError,
    Tolerance,
    check_precision,
    convert,
    graph_facts,
)
from lotus_deploy.export.verify import onnx_weights, two_four_kept
from lotus_deploy.masks import apply_masks_
from lotus_deploy.prune.two_four import two_four_masks

MISSING = prec.missing_packages()
needs_converters = pytest.mark.skipif(bool(MISSING), reason=f"needs the `precision` extra ({', '.join(MISSING)} missing): {prec.INSTALL_HINT}")

INIT_TYPE = {"fp16": "FLOAT16", "bf16": "BFLOAT16", "int8": "INT8", "fp8": "FLOAT8E4M3FN"}
STORED = {"fp16": "float16", "bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}


@pytest.fixture(scope="module")
def sparse_onnx(tmp_path_factory):
    """(fp32 ONNX path, 2:4 layer count): the micro ViT with every block Linear made 2:4 along K."""
    from lotus_deploy.models import build_model
    from lotus_deploy.recipe.base import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="lotus_vit_micro_patch8_32", num_classes=10)).eval()
    masks = {f"{n}.weight": two_four_masks(m.weight) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    apply_masks_(model, masks)
    path = export_onnx(model, tmp_path_factory.mktemp("prec") / "model.onnx", torch.zeros(1, 3, 32, 32))
    return path, len(masks)


def _images(n: int, seed: int) -> np.ndarray:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).numpy()  # (N, 3, 32, 32)


@pytest.fixture(scope="module")
def converted(sparse_onnx):
    """precision -> converted ONNX path (each converted once for the module)."""
    if MISSING:
        pytest.skip(f"needs the `precision` extra ({', '.join(MISSING)} missing)")
    src, _ = sparse_onnx
    return {p: convert(src, src.with_name(f"model.{p}.onnx"), p, _images(32, 1)) for p in ("fp16", "bf16", "int8", "fp8")}


@needs_converters
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_conversion_types_io_two_four_and_agreement(sparse_onnx, converted, precision):
    src, n24 = sparse_onnx
    path = converted[precision]
    facts = graph_facts(path)
    assert facts["precision"] == precision
    assert facts["inputs"] == {"input": "FLOAT"} and facts["outputs"] == {"logits": "FLOAT"}  # IO kept fp32
    assert INIT_TYPE[precision] in facts["initializer_types"]
    if precision in ("int8", "fp8"):
        assert facts["nodes"]["QuantizeLinear"] > 0 and facts["nodes"]["DequantizeLinear"] > 0
    # Every 2:4 weight is still 2:4 along K, judged on the stored (quantized) values.
    assert two_four_kept(src, path) == {"two_four_layers": n24, "kept": n24}
    rows = [r for r, _ in onnx_weights(onnx.load(str(path)))[0] if r["two_four"]]
    assert len(rows) == n24 and {r["dtype"] for r in rows} == {STORED[precision]}
    if precision in ("int8", "fp8"):
        assert all(r["via"][-1] == "DequantizeLinear" for r in rows)
    labels = torch.zeros(64, dtype=torch.long)
    m = check_precision(path, src, torch.from_numpy(_images(64, 2)), labels, precision)
    assert m["finite"] and m["images"] == 64
    assert m["top1_agreement"] >= TOLERANCES[precision].min_agreement and m["max_rel_diff"] <= TOLERANCES[precision].max_rel_diff
    assert 0 < m["max_abs_diff"]  # it really ran in another precision
    if precision == "bf16":  # ONNX Runtime CPU has no bf16 Conv: the reference evaluator runs it, and says so
        assert m["runtime"].startswith("onnx.reference")
    else:
        assert m["runtime"] == "onnxruntime CPU"


@needs_converters
def test_quantized_weight_that_lost_two_four_fails(sparse_onnx, converted, tmp_path):
    src, _ = sparse_onnx
    model = onnx.load(str(converted["int8"]))
    row = next(r for r, _ in onnx_weights(model)[0] if r["two_four"])
    init = next(t for t in model.graph.initializer if t.name == row["name"])
    q = numpy_helper.to_array(init).copy()
    zero = np.argwhere(np.moveaxis(q, row["axis"], -1) == 0)[0]  # a zero of the first group with zeros
    np.moveaxis(q, row["axis"], -1)[tuple(zero)] = 7
    init.CopyFrom(numpy_helper.from_array(q, init.name))
    bad = tmp_path / "model.int8.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match=r"1 of 8 2:4 weight\(s\) of model.onnx are not 2:4 in model.int8.onnx: .*int8.*1 of"):
        two_four_kept(src, bad)


@needs_converters
def test_check_fails_loudly(sparse_onnx, converted, tmp_path):
    src, _ = sparse_onnx
    images, labels = torch.from_numpy(_images(16, 3)), torch.zeros(16, dtype=torch.long)
    strict = Tolerance(min_agreement=1.0, max_top1_drop=0.0, max_rel_diff=1e-9)
    with pytest.raises(PrecisionCheckError, match=r"model.int8.onnx \(onnxruntime CPU\) vs fp32 on 16 eval images: max logit difference .* of the largest fp32 logit \(> 1e-09\)$"):
        check_precision(converted["int8"], src, images, labels, "int8", tolerance=strict)
    model = onnx.load(str(converted["fp16"]))  # a NaN weight: every logit NaN, NaN never passes
    init = next(t for t in model.graph.initializer if t.name == "head.weight")
    init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, dtype=np.float16), init.name))
    nan = tmp_path / "model.fp16.onnx"
    onnx.save(model, str(nan))
    with pytest.raises(PrecisionCheckError, match=r"non-finite logits; top-1 agreement 0.0% < 99.0%.*max logit difference nan"):
        check_precision(nan, src, images, labels, "fp16")


@needs_converters
def test_polygraphy_sees_the_same_sparse_weights(sparse_onnx, converted):
    """polygraphy's `inspect sparsity` agrees on fp32 and fp16; it skips int8 weights, which the gate judges."""
    exe = Path(sys.executable).parent / "polygraphy"
    if not exe.is_file():
        pytest.skip("the polygraphy command (dev extra) is not installed")
    src, n24 = sparse_onnx

    def polygraphy(path) -> str:
        return subprocess.run([str(exe), "inspect", "sparsity", str(path)], capture_output=True, text=True, timeout=120, check=True).stdout

    for path in (src, converted["fp16"]):
        found = {ln.split("Found sparse tensor: ")[1].strip() for ln in polygraphy(path).splitlines() if "Found sparse tensor: " in ln}
        ours = {r["name"] for r, _ in onnx_weights(onnx.load(str(path)))[0] if r["two_four"]}
        assert found == ours and len(ours) == n24
    out = polygraphy(converted["int8"])
    assert "unsupported type: int8" in out and "Found sparse tensor" not in out


@needs_converters
def test_triton_records_the_precision(converted, tmp_path):
    from lotus_deploy.export.triton import write_repository

    for p in ("fp16", "int8"):
        text = write_repository(converted[p], tmp_path, f"m_{p}").read_text()
        assert f'key: "precision"\n  value {{ string_value: "{p}" }}' in text
        assert text.count("data_type: TYPE_FP32") == 2  # IO kept fp32


@needs_converters
@pytest.mark.slow  # converts and checks the tiny run's model on its digits data (~10 s)
def test_precision_step_of_a_run(tiny_run, tmp_path):
    """int8 calibrated on the train split, checked on eval images; files and metrics written."""
    import json

    from lotus_deploy.export.precision import calibration_images, precision_for_state
    from lotus_deploy.run import Run
    from lotus_deploy.state import RunState

    state = RunState.from_run(Run(tiny_run), quiet=True)
    calib = calibration_images(state.data, 50, seed=0)
    assert calib.shape == (50, 3, 32, 32) and torch.isfinite(calib).all()
    assert torch.equal(calib, calibration_images(state.data, 50, seed=0))  # seeded
    for f in ("model.onnx", "preprocess.json"):
        shutil.copyfile(tiny_run / "export" / f, tmp_path / f)
    metrics, arts = precision_for_state(state, tmp_path / "model.onnx", "int8")
    assert arts == {"onnx_int8": tmp_path / "model.int8.onnx", "onnx_int8_json": tmp_path / "model.int8.json"}
    assert json.loads(arts["onnx_int8_json"].read_text())["top1"] == metrics["top1"]
    assert metrics["calibration_images"] == 128 and metrics["images"] == 100  # recipe defaults; eval_subset 100
    assert metrics["graph"]["precision"] == "int8" and metrics["top1_drop"] <= TOLERANCES["int8"].max_top1_drop
    assert precision_for_state(state, tmp_path / "model.onnx", "fp32") == ({}, {})


def test_missing_packages_exit_2_naming_the_extra(tiny_run, monkeypatch):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(prec.PrecisionUnavailable, match=r"^the fp16 ONNX needs nvidia-modelopt, not installed: pip install -e '\.\[precision\]'$"):
        prec.convert("model.onnx", "model.fp16.onnx", "fp16")
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--precision", "int8"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["error: the int8 ONNX needs nvidia-modelopt, not installed: pip install -e '.[precision]'"]
    bad = CliRunner().invoke(main, ["export", str(tiny_run), "--precision", "fp9"])
    assert bad.exit_code == 2 and "precision must be one of fp32, fp16, bf16, int8, fp8" in bad.stderr


@needs_converters
@pytest.mark.slow  # exports the tiny run again and converts it (~10 s)
def test_cli_export_precision_and_triton(tiny_run, tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    out, repo = tmp_path / "exp", tmp_path / "repo"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--precision", "fp16", "--triton", str(repo)])
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file() and (out / "model.fp16.onnx").is_file() and (out / "model.fp16.json").is_file()
    assert f"fp16: {out / 'model.fp16.onnx'}  top-1 " in r.stdout and "agreement 100.0%" in r.stdout
    text = (repo / "tiny" / "config.pbtxt").read_text()
    assert 'string_value: "fp16"' in text and graph_facts(repo / "tiny" / "1" / "model.onnx")["precision"] == "fp16"


@needs_converters
@pytest.mark.slow  # exports, quantizes (~10 s)
def test_cli_export_int8_trt_without_tensorrt(tiny_run, tmp_path):
    """The int8 ONNX and its trtexec script are written, then exit 2 with one line naming what is missing."""
    from click.testing import CliRunner

    from lotus_deploy.cli import main
    from lotus_deploy.export.trt import unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built")
    out = tmp_path / "exp"
    r = CliRunner().invoke(main, ["export", str(tiny_run), "--out", str(out), "--precision", "int8", "--trt"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: TensorRT is not available") and "pip install tensorrt" in r.stderr
    script = (out / "trtexec.int8.sh").read_text()
    assert "--onnx=model.int8.onnx --saveEngine=model.int8.plan" in script
    assert "--int8" not in script and "--fp16" not in script and "--sparsity=disable" in script  # the tiny run has no 2:4 layers
