"""The command line through click's test runner, and ``python cli.py`` == ``lotus``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT, subprocess_env

from lotus_deploy.cli import main
from lotus_deploy.files import read_json


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def recipe_file(tmp_path, tiny_recipe_dict) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict, sort_keys=False))
    return p


def test_validate_ok(runner, recipe_file):
    r = runner.invoke(main, ["validate", str(recipe_file)])
    assert r.exit_code == 0, r.output
    assert "ok (4 stages: train, magnitude_prune, recover, bake)" in r.stdout


def test_validate_shipped_demo(runner):
    r = runner.invoke(main, ["validate", str(ROOT / "recipes" / "demo.yaml")])
    assert r.exit_code == 0, r.output


def test_validate_invalid_lists_every_problem(runner, tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["device"] = "gpu"
    tiny_recipe_dict["stages"][1]["sparsity"] = 1.0
    tiny_recipe_dict["model"]["depth"] = 3
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe_dict))
    r = runner.invoke(main, ["validate", str(p)])
    assert r.exit_code == 2
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)  # a clean exit, not a crash
    assert len(r.stderr.strip().splitlines()) == 3 and all(line.startswith(f"{p}: ") for line in r.stderr.strip().splitlines())
    for loc in ("device", "stages.1.sparsity", "model.depth"):
        assert f"{p}: {loc}: " in r.stderr, loc
    assert "unknown field; allowed: name, weights" in r.stderr


def test_validate_set_override(runner, recipe_file):
    r = runner.invoke(main, ["validate", str(recipe_file), "--set", "stages.1.sparsity=0.6"])
    assert r.exit_code == 0
    r = runner.invoke(main, ["validate", str(recipe_file), "--set", "stages.1.sparsity=1.0", "--set", "nope"])
    assert r.exit_code == 2
    assert "stages.1.sparsity" in r.stderr and "--set: expected KEY=VALUE" in r.stderr


@pytest.mark.parametrize(
    "content,fragment",
    [(None, "no such file"), ("version: 1\nname: [x\n", "invalid YAML: line 3"), ("- 1\n- 2\n", "a recipe must be a YAML mapping")],
    ids=["missing-file", "bad-yaml", "not-a-mapping"],
)
def test_validate_unreadable_recipes(runner, tmp_path, content, fragment):
    p = tmp_path / "r.yaml"
    if content is not None:
        p.write_text(content)
    r = runner.invoke(main, ["validate", str(p)])
    assert r.exit_code == 2 and fragment in r.stderr and "Traceback" not in r.output


def test_schema_is_json(runner):
    r = runner.invoke(main, ["schema"])
    assert r.exit_code == 0
    s = json.loads(r.stdout)
    assert s["title"] == "Recipe" and "stages" in s["properties"] and "$defs" in s


def test_compress_export_bench(runner, recipe_file, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(main, ["compress", str(recipe_file), "--out", str(out), "--quiet", "--set", "stages.0.steps=2"])
    assert r.exit_code == 0, r.output
    assert f"run: {out}" in r.stdout
    m = read_json(out / "manifest.json")
    assert [e["status"] for e in m["stages"]] == ["done"] * 4
    assert m["stages"][0]["metrics"]["history"][-1]["step"] == 2  # --set reached the run

    r = runner.invoke(main, ["export", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "export" / "model.onnx").is_file() and "top-1 agreement 100.0%" in r.stdout

    bench_out = tmp_path / "bench"
    r = runner.invoke(main, ["bench", str(out), "--batch", "1,2", "--iters", "2", "--backends", "torch_cpu,onnxruntime_cpu",
                             "--variants", "dense,final", "--out", str(bench_out)])
    assert r.exit_code == 0, r.output
    assert f"report: {bench_out / 'report.md'}" in r.stdout
    md = (bench_out / "report.md").read_text()
    for word in ("dense", "final", "torch_cpu", "onnxruntime_cpu"):
        assert word in md, word


def test_compress_refuses_existing_run(runner, recipe_file, tiny_run, tmp_path):
    out = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    r = runner.invoke(main, ["compress", str(recipe_file), "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "already holds a run" in r.stderr and "Traceback" not in r.output


def test_compress_invalid_recipe_exits_2_before_writing(runner, recipe_file, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(main, ["compress", str(recipe_file), "--out", str(out), "--set", "stages.1.sparsity=1"])
    assert r.exit_code == 2 and "stages.1.sparsity" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["export", "bench"])
def test_commands_refuse_a_non_run_directory(runner, tmp_path, command):
    r = runner.invoke(main, [command, str(tmp_path)])
    assert r.exit_code == 2 and "not a lotus run directory" in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("args", [["--help"], ["compress", "--help"], ["--version"]], ids=["help", "compress-help", "version"])
def test_cli_py_behaves_like_lotus(args):
    lotus = Path(sys.executable).parent / "lotus"
    if not lotus.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = subprocess_env()
    a = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    b = subprocess.run([str(lotus), *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.strip()
    if args == ["--help"]:
        for cmd in ("validate", "schema", "compress", "export", "bench"):
            assert cmd in a.stdout


def test_cli_py_validate_exit_code(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 2\n")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "validate", str(p)], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "version" in r.stderr and "Traceback" not in r.stderr


def test_cli_imports_are_light():
    """`lotus --help` / `validate` must not pay for torch, timm or onnx."""
    code = "import sys, lotus_deploy.cli, lotus_deploy.recipe; print(sorted(m for m in ('torch', 'timm', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=subprocess_env())
    assert out.stdout.strip() == "[]"
