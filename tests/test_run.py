"""The run directory read for serving and export: variants of finished and unfinished runs,
verified checkpoints, the latest finished run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lotus_deploy.errors import RunError
from lotus_deploy.files import read_json, write_json
from lotus_deploy.recipe import parse_recipe
from lotus_deploy.run import Run, latest_run, unfinished, variant_entries


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "runs" / "tiny"))


def test_variants_of_a_finished_run(tiny_run):
    v = Run(tiny_run).variants()
    assert {"initial", "dense", "final", "train", "magnitude_prune", "recover", "bake", "export"} <= set(v)
    assert v["dense"] is v["train"] and v["final"]["name"] == "bake"  # export saves no model


def test_an_unfinished_run_has_no_final(run_copy):
    m = read_json(run_copy / "manifest.json")
    for e in m["stages"][1:]:
        e["status"] = "failed" if e["index"] == 1 else "pending"
    write_json(run_copy / "manifest.json", m)
    run = Run(run_copy)
    assert "final" not in run.variants() and "dense" in run.variants()
    assert unfinished(m)[0] == "magnitude_prune (failed)"
    with pytest.raises(RunError, match="no variant 'final' .* did not finish: magnitude_prune \\(failed\\)"):
        run.load("final")


def test_only_failed_first_stage_exports_nothing_trained(run_copy, tiny_recipe_dict):
    m = read_json(run_copy / "manifest.json")
    for e in m["stages"]:
        e["status"] = "failed" if e["index"] == 0 else "pending"
    v = variant_entries(parse_recipe(tiny_recipe_dict), m)
    assert set(v) == {"initial"}


def test_a_corrupted_checkpoint_is_refused(run_copy):
    m = read_json(run_copy / "manifest.json")
    path = run_copy / next(e for e in m["stages"] if e["name"] == "bake")["artifacts"]["model"]["path"]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RunError, match="does not match its recorded sha256"):
        Run(run_copy).load("final")


def test_a_truncated_manifest_is_one_clear_error(run_copy):
    (run_copy / "manifest.json").write_text('{"version": 1, "stag')
    with pytest.raises(Exception, match="manifest.json: not valid JSON"):
        Run(run_copy)


def test_latest_run_picks_the_newest_finished(run_copy, tmp_path):
    runs = tmp_path / "runs"
    older = Path(shutil.copytree(run_copy, runs / "older"))
    t = (run_copy / "manifest.json").stat().st_mtime - 100  # copytree keeps the fixture's (old) mtimes
    os.utime(older / "manifest.json", (t, t))
    broken = runs / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{")
    unfinished_run = Path(shutil.copytree(run_copy, runs / "unfinished"))
    m = read_json(unfinished_run / "manifest.json")
    m["stages"][-1]["status"] = "failed"
    write_json(unfinished_run / "manifest.json", m)
    assert latest_run(runs) == run_copy
    with pytest.raises(RunError, match="no finished run under"):
        latest_run(tmp_path / "empty")


def test_cli_export_bench_inspect_default_to_the_latest_run(run_copy, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 0, r.output
    assert f"using the latest finished run: {Path('runs') / 'tiny'}" in r.stderr
    monkeypatch.chdir(tmp_path / "runs")
    r = CliRunner().invoke(main, ["inspect"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == ["error: no finished run under runs/: give the run folder (lotus compress writes runs/<name>)"]
