"""``lotus export``: where it writes (never over the export the manifest records), what it refuses
before writing (unfinished variants, changed checkpoints, a missing exporter, a taken Triton
version), RUN defaulting to the latest finished run, and the preprocessing inside the ONNX."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from lotus_deploy.cli import main
from lotus_deploy.errors import RunError
from lotus_deploy.files import read_json, sha256_file
from lotus_deploy.run import Run, verify
from lotus_deploy.stages.export import export_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared tiny run (finished, with an export stage), under tmp/runs/tiny."""
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "tiny"))


def invoke(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def export_entry(run: Path) -> dict:
    return next(e for e in read_json(run / "manifest.json")["stages"] if e["kind"] == "export")


# ----------------------------------------------------------------------------- where it writes (issue 14.4)


def test_export_dir_rules(tiny_run, tmp_path):
    run = Run(tiny_run)
    assert export_dir(run, "final") == tiny_run / "export"  # the model the export stage recorded
    assert export_dir(run, "bake") == tiny_run / "export"  # the same checkpoint by another name
    assert export_dir(run, "initial") == tiny_run / "exports" / "initial"
    assert export_dir(run, "train") == tiny_run / "exports" / "train"
    assert export_dir(run, "initial", tmp_path / "x") == tmp_path / "x"
    with pytest.raises(RunError, match=r"export holds the export that .*manifest.json records for another model; export 'initial' elsewhere"):
        export_dir(run, "initial", tiny_run / "export")


def test_other_variants_never_replace_the_recorded_export(run_copy):
    recorded = snapshot(run_copy / "export")
    r = invoke(run_copy, "--variant", "initial")
    assert r.exit_code == 0, r.output
    assert f"onnx: {run_copy / 'exports' / 'initial' / 'model.onnx'}" in r.stdout
    assert snapshot(run_copy / "export") == recorded and verify(run_copy, export_entry(run_copy)) is None
    r = invoke(run_copy, "--variant", "initial", "--out", run_copy / "export")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "records for another model" in r.stderr
    assert snapshot(run_copy / "export") == recorded
    # The recorded model itself goes to RUN/export, byte for byte what the manifest records: --resume still takes the run.
    r = invoke(run_copy)
    assert r.exit_code == 0, r.output
    assert f"onnx: {run_copy / 'export' / 'model.onnx'}" in r.stdout
    assert verify(run_copy, export_entry(run_copy)) is None
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import load_recipe

    assert compress(load_recipe(run_copy / "recipe.yaml"), out=run_copy, resume=True, quiet=True) == run_copy


def test_force_clears_the_other_exports(run_copy):
    from lotus_deploy.pipeline import RUN_ENTRIES

    assert "exports" in RUN_ENTRIES  # `compress --force` removes RUN/exports with the rest of the old run


def test_unfinished_variant_is_refused_before_writing(run_copy):
    manifest = read_json(run_copy / "manifest.json")
    manifest["stages"][-2]["status"] = "failed"  # bake failed: the run has no final model
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(run_copy)
    r = invoke(run_copy)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "no variant 'final'" in r.stderr and "the run did not finish: bake (failed)" in r.stderr
    assert snapshot(run_copy) == before and not (run_copy / "exports").exists()


def test_changed_checkpoint_is_refused_before_writing(run_copy, tmp_path):
    ckpt = run_copy / Run(run_copy).variants()["final"]["artifacts"]["model"]["path"]
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    ckpt.write_bytes(bytes(data))
    before = snapshot(run_copy)
    r = invoke(run_copy, "--out", tmp_path / "elsewhere")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "model artifact stages/" in r.stderr and "does not match its recorded sha256" in r.stderr
    assert snapshot(run_copy) == before and not (tmp_path / "elsewhere").exists()


def test_without_run_the_latest_finished_run_is_used(run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/tiny is the only run here
    r = invoke("--variant", "initial")
    assert r.exit_code == 0, r.output
    assert "using the latest finished run: runs/tiny" in r.stderr
    assert (run_copy / "exports" / "initial" / "model.onnx").is_file()


def test_without_run_and_no_finished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke()
    assert r.exit_code == 2 and r.stderr.strip() == "error: no finished run under runs/: give the run folder (lotus compress writes runs/<name>)"


# ----------------------------------------------------------------------------- the dynamo exporter (issue 14.15)


def no_onnxscript(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))


DYNAMO_LINE = "export.dynamo: true needs onnxscript, not installed: pip install -e '.[dynamo]' (or use the default exporter, dynamo: false)"


def test_dynamo_without_onnxscript_exits_2_before_writing(run_copy, tmp_path, monkeypatch):
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["export"]["dynamo"] = True
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    no_onnxscript(monkeypatch)
    r = invoke(run_copy, "--variant", "initial")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [f"error: {DYNAMO_LINE}"]
    assert not (run_copy / "exports").exists()
    # validate and compress say it too, before the run folder exists
    recipe["name"] = "dyn"
    path = tmp_path / "dyn.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    for cmd in (["validate", str(path)], ["compress", str(path), "--out", str(tmp_path / "new")]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 2 and r.stderr.strip().splitlines() == [f"{path}: {DYNAMO_LINE}"], r.output
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None, reason="needs onnxscript (the `dynamo` or `precision` extra)")
def test_dynamo_export_runs_with_onnxscript(micro_model, tmp_path):
    """With the extra, `dynamo: true` exports a checked ONNX with a dynamic batch axis."""
    import torch

    from lotus_deploy.export.onnx_export import export_checked

    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = export_checked(micro_model, tmp_path / "model.onnx", images, dynamo=True, metadata={"mean": "[0.5]"})
    assert m["max_abs_diff"] <= 1e-3 and m["top1_agreement"] == 1.0 and m["images"] == 5
    from lotus_deploy.export.metadata import onnx_metadata

    assert onnx_metadata(tmp_path / "model.onnx")["mean"] == "[0.5]"


# ----------------------------------------------------------------------------- preprocessing inside the ONNX (issue 14.16)


def test_onnx_carries_the_preprocessing(tiny_run, tmp_path):
    from lotus_deploy.export.metadata import read_preprocess
    from lotus_deploy.runtime import ort_session

    pre = read_json(tiny_run / "export" / "preprocess.json")
    bare = tmp_path / "model.onnx"
    shutil.copyfile(tiny_run / "export" / "model.onnx", bare)  # no preprocess.json next to it
    assert read_preprocess(bare) == pre
    meta = ort_session(bare).get_modelmeta().custom_metadata_map  # what any ONNX Runtime client sees
    assert json.loads(meta["mean"]) == pre["mean"] and json.loads(meta["classes"]) == pre["classes"]
    assert meta["interpolation"] == json.dumps(pre["interpolation"]) and "(x - mean) / std" in meta["normalize"]
    x = np.zeros((2, 3, 32, 32), dtype=np.float32)
    assert ort_session(bare).run(None, {"input": x})[0].shape == (2, 10)


def test_read_preprocess_without_metadata(micro_model, tmp_path):
    import torch

    from lotus_deploy.export.metadata import read_preprocess
    from lotus_deploy.export.onnx_export import export_onnx

    plain = export_onnx(micro_model, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    assert read_preprocess(plain) is None
    half = export_onnx(micro_model, tmp_path / "h.onnx", torch.zeros(1, 3, 32, 32), metadata={"mean": "[0.5]", "std": "not json"})
    assert read_preprocess(half) is None  # input_size, mean and std are all needed


# ----------------------------------------------------------------------------- Triton options (issue 14.16)


def test_triton_name_version_and_force(run_copy, tmp_path):
    repo = tmp_path / "repo"
    r = invoke(run_copy, "--triton", repo, "--triton-name", "vit", "--triton-version", "3")
    assert r.exit_code == 0, r.output
    assert (repo / "vit" / "3" / "model.onnx").is_file() and f"triton: {repo / 'vit' / 'config.pbtxt'}" in r.stdout
    before = snapshot(repo)
    r = invoke(run_copy, "--variant", "initial", "--triton", repo, "--triton-name", "vit", "--triton-version", "3")
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: {repo / 'vit' / '3'} already holds version 3 of Triton model 'vit': choose another version (--triton-version) or replace it (--force)"]
    assert snapshot(repo) == before and not (run_copy / "exports").exists()  # refused before the export
    r = invoke(run_copy, "--variant", "initial", "--triton", repo, "--triton-name", "vit", "--triton-version", "3", "--force")
    assert r.exit_code == 0, r.output
    assert sha256_file(repo / "vit" / "3" / "model.onnx") == sha256_file(run_copy / "exports" / "initial" / "model.onnx")
    r = invoke(run_copy, "--triton", repo, "--triton-version", "0")
    assert r.exit_code == 2 and "--triton-version" in r.stderr
