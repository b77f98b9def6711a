"""TensorRT engine path: pure helpers and the missing-TensorRT path here; real builds under ``trt``.

The build itself needs the tensorrt package and an NVIDIA GPU: those tests are marked ``trt``
and skipped with the reason :func:`lotus_deploy.trt.unavailable_reason` gives.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lotus_deploy.export import trt
from lotus_deploy.export.trt import (
    BuildSpec,
    match_layers,
    onnx_scope,
    parse_sparsity_log,
    sparsity_report,
    trtexec_command,
)

TRT_MISSING = trt.unavailable_reason()


def prec_missing() -> list[str]:
    from lotus_deploy.export.precision import missing_packages

    return missing_packages()
skip_without_trt = pytest.mark.skipif(TRT_MISSING is not None, reason=f"{TRT_MISSING}")

# Real TensorRT log lines (trtexec --sparsity=enable --verbose, TensorRT 8.x/10.x format).
LOG = [
    "[08/05/2024-12:06:54] [I] [TRT] Total Activation Memory: 7864832",
    "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620, Conv_626",
    "[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: Conv_619 + Relu_620",
    "[08/05/2024-12:06:54] [I] [TRT] [MemUsageChange] TensorRT-managed allocation in building engine: CPU +0, GPU +512",
]


# (TensorRT major, requested, ONNX precision, strongly typed asked) -> (strongly typed, precision flags, built)
PLANS = [
    (10, "fp32", "fp32", False, False, (), "fp32"),
    (10, "fp16", "fp32", False, False, ("FP16",), "fp16"),  # weakly typed + flag on the fp32 ONNX
    (10, "bf16", "fp32", False, False, ("BF16",), "bf16"),
    (10, "fp16", "fp32", True, True, (), "fp32"),  # asked strongly typed: the ONNX decides
    (10, "fp16", "fp16", False, True, (), "fp16"),  # converted ONNX: its types decide
    (10, "int8", "int8", False, True, (), "int8"),  # explicit quantization: strongly typed, no INT8 flag
    (10, "int8", "fp32", False, True, (), "fp32"),  # no Q/DQ: cannot be int8
    (11, "fp32", "fp32", False, True, (), "fp32"),
    (11, "fp16", "fp32", False, True, (), "fp32"),  # 11 has no FP16 flag: the fp32 ONNX builds fp32
    (11, "fp16", "fp16", False, True, (), "fp16"),
    (11, "bf16", "bf16", False, True, (), "bf16"),
    (11, "int8", "int8", False, True, (), "int8"),
    (11, "fp8", "fp8", False, True, (), "fp8"),
]


@pytest.mark.parametrize("major, requested, onnx, asked, typed, flags, built", PLANS,
                         ids=[f"trt{p[0]}-{p[1]}-from-{p[2]}{'-asked-typed' if p[3] else ''}" for p in PLANS])
def test_build_plan(major, requested, onnx, asked, typed, flags, built):
    plan = trt.build_plan(major, requested, onnx, strongly_typed=asked, sparse=True)
    assert (plan.strongly_typed, plan.flags, plan.built) == (typed, flags + ("SPARSE_WEIGHTS",), built)
    if built == requested:
        assert plan.warning is None
    else:
        assert f"{requested} was asked for but the ONNX holds {onnx}" in plan.warning and f"--precision {requested}" in plan.warning
    assert "SPARSE_WEIGHTS" not in trt.build_plan(major, requested, onnx, asked, sparse=False).flags
    assert "SPARSE_WEIGHTS" in trt.build_plan(major, requested, onnx, asked, sparse=None).flags  # auto = on


SOURCES = [  # (TensorRT major, requested, strongly typed asked) -> precision of the ONNX built from
    (10, "fp32", False, "fp32"), (10, "fp16", False, "fp32"), (10, "bf16", False, "fp32"),  # builder flags on model.onnx
    (10, "fp16", True, "fp16"), (10, "int8", False, "int8"), (10, "fp8", False, "fp8"),
    (11, "fp32", False, "fp32"), (11, "fp16", False, "fp16"), (11, "bf16", False, "bf16"), (11, "int8", False, "int8"), (11, "fp8", True, "fp8"),
]


@pytest.mark.parametrize("major, requested, asked, source", SOURCES, ids=[f"trt{m}-{r}{'-typed' if a else ''}" for m, r, a, _ in SOURCES])
def test_source_precision_builds_what_was_asked_for(major, requested, asked, source):
    """The ONNX the engine stage builds from makes build_plan build the requested precision, without a warning."""
    assert trt.source_precision(major, requested, asked) == source
    plan = trt.build_plan(major, requested, source, asked)
    assert plan.built == requested and plan.warning is None
    assert plan.strongly_typed == (major >= 11 or source != "fp32" or asked)


def test_build_plan_rejects():
    with pytest.raises(ValueError, match="TensorRT 8.x is not supported"):
        trt.build_plan(8, "fp16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        trt.build_plan(10, "int4", "fp32")


@pytest.mark.parametrize(
    "major, requested, onnx, asked, present, absent",
    [
        (10, "fp16", "fp32", False, ["--fp16", "--sparsity=enable"], ["--stronglyTyped", "--bf16"]),
        (10, "bf16", "fp32", False, ["--bf16", "--sparsity=enable"], ["--fp16", "--stronglyTyped"]),
        (10, "fp32", "fp32", False, ["--sparsity=enable"], ["--fp16", "--bf16", "--stronglyTyped"]),
        (10, "fp16", "fp32", True, ["--stronglyTyped"], ["--fp16"]),
        (10, "int8", "int8", False, ["--stronglyTyped", "--sparsity=enable"], ["--int8", "--fp16"]),
        (11, "fp16", "fp16", False, ["--sparsity=enable"], ["--stronglyTyped", "--fp16", "--bf16"]),
        (11, "fp16", "fp32", False, ["--sparsity=enable"], ["--stronglyTyped", "--fp16"]),
        (11, "int8", "int8", True, ["--sparsity=enable"], ["--stronglyTyped", "--int8"]),
    ],
    ids=["10-fp16-flag", "10-bf16-flag", "10-fp32", "10-asked-typed", "10-int8-qdq", "11-fp16", "11-fp16-from-fp32", "11-int8"],
)
def test_trtexec_command(tmp_path, major, requested, onnx, asked, present, absent):
    spec = BuildSpec(precision=requested, sparse=True, strongly_typed=asked, min_batch=1, opt_batch=8, max_batch=64, timing_cache=tmp_path / "timing.cache")
    plan = trt.build_plan(major, requested, onnx, asked, spec.sparse)
    cmd = trtexec_command(tmp_path / "model.onnx", tmp_path / "model.plan", "input", (3, 224, 224), spec, plan=plan)
    args = cmd.split()
    assert args[0] == "trtexec"
    for a in ["--onnx=model.onnx", "--saveEngine=model.plan", "--minShapes=input:1x3x224x224", "--optShapes=input:8x3x224x224",
              "--maxShapes=input:64x3x224x224", "--timingCacheFile=timing.cache", "--memPoolSize=workspace:4096", *present]:
        assert a in args, (a, cmd)
    for a in absent:
        assert a not in args
    off = trt.build_plan(major, requested, onnx, asked, sparse=False)
    assert "--sparsity=disable" in trtexec_command(tmp_path / "model.onnx", tmp_path / "model.plan", "input", (3, 8, 8), spec, plan=off)


@pytest.mark.skipif(trt.installed_major() is not None, reason="tensorrt is installed: the default plan follows its version")
def test_trtexec_command_default_is_tensorrt_11_from_the_onnx_types(tmp_path, micro_model):
    """Without tensorrt here the script is written for 11 (what pip installs) and reads the ONNX's precision."""
    import torch

    from lotus_deploy.export.onnx_export import export_onnx

    assert trt.onnx_file_precision(tmp_path / "absent.onnx") == "fp32"
    assert trt.DEFAULT_MAJOR == 11 and trt.trt_major("11.4.0.1") == 11 and trt.trt_major("10.13.3") == 10
    onnx_path = export_onnx(micro_model, tmp_path / "model.onnx", torch.zeros(1, 3, 32, 32))
    cmd = trtexec_command(onnx_path, tmp_path / "model.plan", "input", (3, 32, 32), BuildSpec(precision="fp16"))
    assert "--fp16" not in cmd and "--stronglyTyped" not in cmd and "--sparsity=enable" in cmd


def test_trtexec_script_paths(tmp_path):
    cache = tmp_path / "shared" / "timing.cache"
    spec = BuildSpec(timing_cache=cache)
    cmd = trtexec_command(tmp_path / "e" / "model.onnx", tmp_path / "e" / "model.plan", "input", (3, 32, 32), spec)
    assert f"--timingCacheFile={cache.resolve()}" in cmd  # outside the engine folder: absolute
    script = trt.write_trtexec_script(tmp_path / "e" / "trtexec.sh", cmd)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and 'cd "$(dirname "$0")"' in text and cmd in text


@pytest.mark.parametrize("bad", [dict(min_batch=4, opt_batch=2), dict(opt_batch=64, max_batch=32), dict(precision="int4")])
def test_build_spec_rejects(bad):
    with pytest.raises(ValueError):
        BuildSpec(**bad)


def test_parse_sparsity_log():
    rep = parse_sparsity_log(LOG)
    assert rep == {"reported": True, "eligible": ["MatMul_401", "Conv_619 + Relu_620", "Conv_626"], "picked": ["Conv_619 + Relu_620"]}
    empty = parse_sparsity_log(["[I] [TRT] (Sparsity) Layers eligible for sparse math: ",
                                "[I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: "])
    assert empty == {"reported": True, "eligible": [], "picked": []}
    assert parse_sparsity_log(["[I] nothing about sparsity"])["reported"] is False


def test_onnx_scope_matches_exported_matmuls(micro_model, tmp_path):
    """Each block Linear's scope fragment names exactly one MatMul of the exported graph."""
    import onnx
    import torch
    import torch.nn as nn

    from lotus_deploy.export.onnx_export import export_onnx

    path = export_onnx(micro_model, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    nodes = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMul", "Gemm")]
    linears = [n for n, m in micro_model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert onnx_scope("blocks.0.mlp.fc1") == "/blocks.0/mlp/fc1/"
    for name in linears:
        assert sum(onnx_scope(name) in node for node in nodes) == 1, name
    fused = [f"{nodes[1]} + /blocks/blocks.0/mlp/act/Mul"]
    assert match_layers(linears, fused) == {n: onnx_scope(n) in fused[0] for n in linears}


def test_sparsity_report_warns_when_nothing_is_picked():
    layers = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    none_picked = sparsity_report(["(Sparsity) Layers eligible for sparse math: /blocks/blocks.0/mlp/fc1/MatMul",
                                   "(Sparsity) TRT inference plan picked sparse implementation for layers: "], layers, True)
    assert "picked NO sparse implementation" in none_picked["warning"]
    assert none_picked["layers"]["blocks.0.mlp.fc1"] == {"eligible": True, "picked": False}
    picked = sparsity_report(["(Sparsity) TRT inference plan picked sparse implementation for layers: /blocks/blocks.0/mlp/fc2/MatMul"], layers, True)
    assert picked["warning"] is None and picked["layers"]["blocks.0.mlp.fc2"]["picked"] is True
    assert "without SPARSE_WEIGHTS" in sparsity_report([], layers, False)["warning"]
    assert sparsity_report([], [], True)["warning"] is None  # no 2:4 layers, nothing to warn about


def test_two_four_layers(micro_model):
    from lotus_deploy.prune.two_four import two_four_layers, two_four_masks

    assert two_four_layers(micro_model) == []
    w = micro_model.blocks[1].mlp.fc1.weight
    masks = {"blocks.1.mlp.fc1.weight": two_four_masks(w)}
    assert two_four_layers(micro_model, masks) == ["blocks.1.mlp.fc1"]


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present: the missing-TensorRT path is not taken")
def test_unavailable_reason_says_how_to_install():
    assert "pip install tensorrt" in TRT_MISSING and "\n" not in TRT_MISSING
    with pytest.raises(trt.TensorRTUnavailable, match="pip install tensorrt"):
        trt.build_engine(Path("model.onnx"), Path("model.plan"))
    with pytest.raises(trt.TensorRTUnavailable):
        trt.TensorRTSession("model.plan")


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are present: the missing-TensorRT path is not taken")
@pytest.mark.slow  # a subprocess: imports torch, timm, sklearn and exports (~8 s idle, 30 s on a loaded machine)
def test_cli_export_trt_without_tensorrt(tiny_run, tmp_path):
    """The ONNX (and trtexec.sh) are written, then exit code 2 with one line naming what is missing."""
    from conftest import subprocess_env

    out, repo = tmp_path / "exp", tmp_path / "triton"
    proc = subprocess.run(
        [sys.executable, "-m", "lotus_deploy.cli", "export", str(tiny_run), "--trt", "--out", str(out), "--triton", str(repo)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (out / "model.onnx").is_file() and (out / "preprocess.json").is_file() and (out / "trtexec.fp16.sh").is_file()
    if not prec_missing():  # the engine stage's default fp16, made for TensorRT 11
        assert (out / "model.fp16.onnx").is_file() and "--onnx=model.fp16.onnx" in (out / "trtexec.fp16.sh").read_text()
    assert not list(out.glob("*.plan")) and not repo.exists()
    errors = [ln for ln in proc.stderr.strip().splitlines() if "error" in ln.lower() or "tensorrt" in ln.lower()]
    assert errors == [proc.stderr.strip().splitlines()[-1]] and "pip install tensorrt" in errors[0]
    assert "model.onnx" in proc.stdout


def test_engine_stage_skip_and_fail(tiny_recipe_dict, tmp_path):
    """``if_unavailable: skip`` records the reason and keeps the ONNX (fp32 and, for TensorRT 11, the
    converted fp16 one the engine would be built from); ``fail`` stops the run."""
    from lotus_deploy.errors import RunError
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import parse_recipe
    from lotus_deploy.recipe.stages import Engine
    from lotus_deploy.run import Run
    from lotus_deploy.stages.engine import engine
    from lotus_deploy.state import RunState

    raw = copy.deepcopy(tiny_recipe_dict)
    raw["stages"] = [{"kind": "engine", "if_unavailable": "skip", "max_batch": 16}]
    raw["export"] = {"check_images": 8}
    run_dir = compress(parse_recipe(raw), out=tmp_path / "run", quiet=True)
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"][0]
    assert entry["status"] == "done"
    if TRT_MISSING is None:
        pytest.skip("TensorRT present: the engine was built, nothing was skipped")
    if prec_missing():  # the fp16 ONNX cannot be made: skipped for that reason, before anything is written
        assert entry["metrics"]["skipped"].startswith("the fp16 ONNX needs") and entry["artifacts"] == {}
        return
    assert entry["metrics"] == {"skipped": TRT_MISSING}
    assert set(entry["artifacts"]) == {"onnx", "preprocess", "trtexec", "onnx_fp16", "onnx_fp16_json"}
    script = (run_dir / "engine" / "trtexec.sh").read_text()
    assert "--maxShapes=input:16x3x32x32" in script and "--onnx=model.fp16.onnx" in script
    assert "--fp16" not in script  # written for TensorRT 11: strongly typed from the fp16 ONNX
    state = RunState.from_run(Run(run_dir), quiet=True)
    with pytest.raises(RunError, match="pip install tensorrt"):
        engine(Engine(), state)


def test_engine_config_validation(tiny_recipe_dict):
    from lotus_deploy.recipe import RecipeError, parse_recipe

    raw = copy.deepcopy(tiny_recipe_dict)
    raw["stages"] = [{"kind": "engine", "min_batch": 8, "opt_batch": 4}]
    with pytest.raises(RecipeError, match="min_batch <= opt_batch"):
        parse_recipe(raw)


# ----------------------------------------------------------------------------- needs TensorRT + GPU


@pytest.mark.trt
@skip_without_trt
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_build_engine_runs_and_matches_onnxruntime(tiny_run, tmp_path, precision):
    from lotus_deploy.export.triton import write_repository
    from lotus_deploy.runtime import compare, load

    onnx_path = tiny_run / "export" / "model.onnx"
    work = tmp_path / "e"
    work.mkdir()
    for f in ("model.onnx", "preprocess.json"):
        (work / f).write_bytes((onnx_path.parent / f).read_bytes())
    pre = json.loads((work / "preprocess.json").read_text())
    spec = BuildSpec(precision=precision, sparse=True, min_batch=1, opt_batch=4, max_batch=8, timing_cache=work / "timing.cache", workspace_mib=512)
    res = trt.build_engine(work / "model.onnx", work / "model.plan", spec, preprocess=pre, two_four_layers=[])
    info = json.loads(res.sidecar.read_text())
    for key in ("tensorrt", "precision", "gpu", "compute_capability", "flags", "profiles", "build_s", "sha256", "io", "preprocess", "trtexec", "sparsity"):
        assert key in info, key
    assert info["profiles"]["input"]["max"] == [8, 3, 32, 32] and (work / "timing.cache").stat().st_size > 0
    assert res.log.read_text().strip() and res.trtexec.is_file()
    again = trt.build_engine(work / "model.onnx", work / "model2.plan", spec, preprocess=pre, two_four_layers=[])
    assert again.info["timing_cache_reused"] is True

    from lotus_deploy.data import build_data
    from lotus_deploy.models import InputSpec
    from lotus_deploy.run import Run

    engine = load(res.path)
    assert engine.max_batch == 8
    data = build_data(Run(tiny_run).recipe.data, InputSpec(3, 32, 32, tuple(pre["mean"]), tuple(pre["std"])))
    out = compare(engine, load(work / "model.onnx", providers=["CPUExecutionProvider"]), data.eval_loader(batch_size=20))
    assert out["top1_agreement"] >= 0.97 and abs(out["a"]["top1"] - out["b"]["top1"]) <= 3.0
    cfg = write_repository(res.path, tmp_path / "repo", "tiny")
    assert 'platform: "tensorrt_plan"' in cfg.read_text() and (cfg.parent / "1" / "model.plan").is_file()



@pytest.mark.trt
@skip_without_trt
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_build_engine_from_converted_onnx(tiny_run, tmp_path, precision):
    """The engine computes in the converted ONNX's precision on TensorRT 10 and 11 (sidecar says so)."""
    from lotus_deploy.export.precision import missing_packages, precision_for_state
    from lotus_deploy.run import Run
    from lotus_deploy.runtime import compare, load
    from lotus_deploy.state import RunState

    if missing_packages():
        pytest.skip(f"needs the `precision` extra: {missing_packages()} missing")
    for f in ("model.onnx", "preprocess.json"):
        (tmp_path / f).write_bytes((tiny_run / "export" / f).read_bytes())
    state = RunState.from_run(Run(tiny_run), quiet=True)
    _, arts = precision_for_state(state, tmp_path / "model.onnx", precision)
    spec = BuildSpec(precision=precision, sparse=True, min_batch=1, opt_batch=4, max_batch=8, workspace_mib=512)
    res = trt.build_engine(arts[f"onnx_{precision}"], tmp_path / f"model.{precision}.plan", spec, two_four_layers=[])
    info = json.loads(res.sidecar.read_text())
    assert info["precision"]["built"] == precision and info["precision"]["warning"] is None
    assert info["precision"]["strongly_typed"] is True and "--fp16" not in info["trtexec"]
    out = compare(load(res.path), load(tmp_path / "model.onnx", providers=["CPUExecutionProvider"]), state.data.eval_loader(batch_size=8))
    assert out["top1_agreement"] >= 0.95
