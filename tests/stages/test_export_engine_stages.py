"""The ``export`` stage in ``export.precision`` and the ``engine`` stage building from the ONNX of its precision.

Conversions need the ``precision`` extra (skipped without it, with the reason). The TensorRT
builds need tensorrt and an NVIDIA GPU: marked ``trt``, skipped here (no GPU) with the reason;
what is checked here is everything before the build (the ONNX chosen, converted and checked, and
the ``trtexec`` script for the TensorRT major version).
"""

from __future__ import annotations

import copy
import json

import pytest

from lotus_deploy.export import trt
from lotus_deploy.export.precision import INSTALL_HINT, missing_packages
from lotus_deploy.files import read_json, sha256_file

MISSING = missing_packages()
needs_converters = pytest.mark.skipif(bool(MISSING), reason=f"needs the `precision` extra ({', '.join(MISSING)} missing): {INSTALL_HINT}")
TRT_MISSING = trt.unavailable_reason()


def run_stages(tiny_recipe_dict, tmp_path, stages, **export):
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe

    raw = copy.deepcopy(tiny_recipe_dict)
    raw["stages"] = stages
    raw["export"] = {"check_images": 8, "precision_images": 50, "calibration_images": 20, **export}
    run_dir = compress(parse_recipe(raw), out=tmp_path / "run", quiet=True)
    return run_dir, read_json(run_dir / "manifest.json")["stages"]


@needs_converters
def test_export_stage_writes_and_records_the_precision(tiny_recipe_dict, tmp_path):
    from lotus_deploy.export.graph_precision import graph_facts
    from lotus_deploy.export.metadata import read_preprocess

    run_dir, (entry,) = run_stages(tiny_recipe_dict, tmp_path, [{"kind": "export"}], precision="fp16")
    assert entry["status"] == "done"
    arts = entry["artifacts"]
    assert set(arts) == {"onnx", "preprocess", "onnx_fp16", "onnx_fp16_json"}
    fp16 = run_dir / arts["onnx_fp16"]["path"]
    assert fp16 == run_dir / "export" / "model.fp16.onnx" and sha256_file(fp16) == arts["onnx_fp16"]["sha256"]
    m = entry["metrics"]["precision"]
    assert m["precision"] == "fp16" and m["images"] == 50 and m["top1_agreement"] >= 0.99 and m["runtime"] == "onnxruntime CPU"
    assert read_json(run_dir / "export" / "model.fp16.json")["top1"] == m["top1"]
    assert graph_facts(fp16)["precision"] == "fp16"
    assert read_preprocess(fp16) == read_json(run_dir / "export" / "preprocess.json")  # the metadata goes along


def test_export_stage_without_the_extra_fails_before_the_run(tiny_recipe_dict, tmp_path, monkeypatch):
    """`export.precision: int8` without ModelOpt: validate/compress exit 2 naming the field and the extra."""
    import importlib.util

    import yaml
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    raw = copy.deepcopy(tiny_recipe_dict)
    raw["stages"] = [{"kind": "export"}, {"kind": "engine", "precision": "int8"}, {"kind": "engine", "precision": "fp32"},
                     {"kind": "engine", "precision": "int8", "if_unavailable": "skip"}]
    raw["export"] = {"precision": "int8"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(main, ["compress", str(path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and not (tmp_path / "run").exists()
    line = "the int8 ONNX needs nvidia-modelopt, not installed: pip install -e '.[precision]'"
    assert r.stderr.strip().splitlines() == [f"{path}: export.precision: {line}", f"{path}: stages.1.precision: {line}"]


@needs_converters
def test_engine_stage_converts_and_writes_trtexec_for_tensorrt_11(tiny_recipe_dict, tmp_path):
    """int8 asked: the Q/DQ ONNX is made and checked; the script builds it strongly typed, no --int8."""
    if TRT_MISSING is None:
        pytest.skip("TensorRT and a GPU are present: the engine is built (see the trt test below)")
    run_dir, (entry,) = run_stages(tiny_recipe_dict, tmp_path, [{"kind": "engine", "precision": "int8", "if_unavailable": "skip", "max_batch": 8}])
    assert entry["status"] == "done" and entry["metrics"] == {"skipped": TRT_MISSING}
    assert set(entry["artifacts"]) == {"onnx", "preprocess", "onnx_int8", "onnx_int8_json", "trtexec"}
    check = read_json(run_dir / "engine" / "model.int8.json")
    assert check["graph"]["precision"] == "int8" and check["calibration_images"] == 20 and check["images"] == 50
    script = (run_dir / "engine" / "trtexec.sh").read_text()
    assert "--onnx=model.int8.onnx --saveEngine=model.plan" in script
    assert "--int8" not in script and "--stronglyTyped" not in script and "--sparsity=disable" in script  # 11; no 2:4 layers


def test_engine_stage_on_tensorrt_10_uses_the_flag_on_the_fp32_onnx(tiny_recipe_dict, tmp_path, monkeypatch):
    """fp16 on TensorRT 10 (not strongly typed): model.onnx with --fp16, nothing converted; sparse: on sets --sparsity."""
    from lotus_deploy.export.trt import TensorRTUnavailable

    monkeypatch.setattr(trt, "installed_major", lambda: 10)
    monkeypatch.setattr(trt, "unavailable_reason", lambda: "TensorRT 10 test double: no GPU")
    with pytest.raises(TensorRTUnavailable):  # the stage fails (if_unavailable: fail) after writing the script
        run_stages(tiny_recipe_dict, tmp_path, [{"kind": "engine", "precision": "fp16", "sparse": "on"}])
    files = {p.name for p in (tmp_path / "run" / "engine").iterdir()}
    assert {"model.onnx", "preprocess.json", "trtexec.sh"} <= files and "model.fp16.onnx" not in files
    script = (tmp_path / "run" / "engine" / "trtexec.sh").read_text()
    assert "--onnx=model.onnx" in script and "--fp16" in script and "--sparsity=enable" in script and "--stronglyTyped" not in script
    entry = read_json(tmp_path / "run" / "manifest.json")["stages"][0]
    assert entry["status"] == "failed" and "TensorRT 10 test double" in entry["error"]


def test_engine_precision_field(tiny_recipe_dict):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    raw = copy.deepcopy(tiny_recipe_dict)
    for p in ("fp32", "fp16", "bf16", "int8", "fp8"):
        raw["stages"] = [{"kind": "engine", "precision": p}]
        assert parse_recipe(raw).stages[0].precision == p
    raw["stages"] = [{"kind": "engine", "precision": "int4"}]
    with pytest.raises(RecipeError, match="stages.0.precision"):
        parse_recipe(raw)


# ----------------------------------------------------------------------------- needs TensorRT + GPU


@pytest.mark.trt
@pytest.mark.skipif(TRT_MISSING is not None, reason=f"{TRT_MISSING}")
@needs_converters
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_engine_stage_builds_the_precision_asked_for(tiny_recipe_dict, tmp_path, precision):
    """UNTESTED HERE (no GPU): the sidecar and the stage's metrics record the TensorRT version and
    the precision really built; sparse: on sets SPARSE_WEIGHTS."""
    run_dir, (entry,) = run_stages(tiny_recipe_dict, tmp_path, [{
        "kind": "engine", "precision": precision, "sparse": "on", "max_batch": 8, "workspace_mib": 512, "max_top1_drop": 5.0}])
    assert entry["status"] == "done", entry.get("error")
    m = entry["metrics"]
    assert m["precision"]["requested"] == m["precision"]["built"] == precision and m["precision"]["warning"] is None
    assert m["tensorrt"].split(".")[0] in ("10", "11") and m["onnx"] in ("model.onnx", f"model.{precision}.onnx")
    side = json.loads((run_dir / "engine" / "model.plan.json").read_text())
    assert side["tensorrt"] == m["tensorrt"] and side["flags"].get("SPARSE_WEIGHTS") is True
    assert m["accuracy"]["top1_agreement"] >= 0.9
