"""The runner: run directory, manifest, variants, resume after a kill, and every refusal."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import TINY_RECIPE, subprocess_env

from lotus_deploy.cli import main
from lotus_deploy.errors import RunError
from lotus_deploy.files import load_tensors, read_json, sha256_file
from lotus_deploy.masks import masks_hash
from lotus_deploy.pipeline import compress
from lotus_deploy.recipe import load_recipe, parse_recipe, stage_fingerprint
from lotus_deploy.run import Run

STAGE_DIRS = ["01_train", "02_magnitude_prune", "03_recover", "04_bake", "05_export"]


def tiny_run_recipe_dict() -> dict:
    """The recipe of the shared ``tiny_run`` fixture (TINY_RECIPE + export)."""
    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"].append({"kind": "export"})
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A writable copy of the finished tiny run."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    m = read_json(run_dir / "manifest.json")
    bake = next(e for e in m["stages"] if e["kind"] == "bake")
    return load_tensors(run_dir / bake["artifacts"]["model"]["path"])


def bake_hash(run_dir: Path) -> str:
    m = read_json(run_dir / "manifest.json")
    return next(e for e in m["stages"] if e["kind"] == "bake")["metrics"]["baked_masks_hash"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- layout and manifest


def test_run_directory_layout(tiny_run):
    for f in ("recipe.yaml", "manifest.json", "env.json", "run.log", "subsets.json", "initial/model.safetensors"):
        assert (tiny_run / f).is_file(), f
    assert sorted(p.name for p in (tiny_run / "stages").iterdir()) == STAGE_DIRS
    for d, has_masks in [("01_train", False), ("02_magnitude_prune", True), ("03_recover", True), ("04_bake", False)]:
        assert (tiny_run / "stages" / d / "model.safetensors").is_file()
        assert (tiny_run / "stages" / d / "masks.safetensors").is_file() is has_masks, d
    assert (tiny_run / "stages/01_train/history.csv").is_file()
    assert (tiny_run / "export/model.onnx").is_file()
    assert not [p for p in tiny_run.rglob("*.tmp")], "temporary files left behind"
    assert "run complete" in (tiny_run / "run.log").read_text()


def test_resolved_recipe_and_environment(tiny_run):
    assert load_recipe(tiny_run / "recipe.yaml") == parse_recipe(tiny_run_recipe_dict())
    env = read_json(tiny_run / "env.json")
    for key in ("python", "platform", "cpu", "cpu_count", "torch_threads", "torch", "timm", "onnx", "onnxruntime", "cuda_available"):
        assert key in env, key
    assert env["torch"] == torch.__version__


def test_subsets_are_saved_and_class_balanced(tiny_run):
    from lotus_deploy.data import DigitsDataset

    sub = read_json(tiny_run / "subsets.json")
    assert sub["seed"] == 0 and len(sub["train"]) == 200 and len(sub["eval"]) == 100
    targets = DigitsDataset(train=True).targets
    counts = torch.bincount(torch.tensor([targets[i] for i in sub["train"]]), minlength=10)
    assert counts.tolist() == [20] * 10


def test_manifest_records_every_stage(tiny_run):
    m = read_json(tiny_run / "manifest.json")
    recipe = load_recipe(tiny_run / "recipe.yaml")
    assert m["version"] == 1 and m["name"] == "tiny" and m["created"]
    assert [e["name"] for e in m["stages"]] == ["train", "magnitude_prune", "recover", "bake", "export"]
    for i, e in enumerate(m["stages"]):
        assert e["index"] == i and e["status"] == "done"
        assert e["started"] <= e["ended"] and e["wall_s"] >= 0
        assert e["fingerprint"] == stage_fingerprint(recipe, i)
        for a in e["artifacts"].values():
            f = tiny_run / a["path"]
            assert sha256_file(f) == a["sha256"] and f.stat().st_size == a["bytes"]
    init = m["initial"]
    assert init["status"] == "done" and sha256_file(tiny_run / init["artifacts"]["model"]["path"]) == init["artifacts"]["model"]["sha256"]


def test_masks_hash_is_carried_to_bake(tiny_run):
    m = read_json(tiny_run / "manifest.json")
    by = {e["name"]: e for e in m["stages"]}
    h = by["magnitude_prune"]["metrics"]["masks_hash"]
    assert masks_hash(load_tensors(tiny_run / by["magnitude_prune"]["artifacts"]["masks"]["path"])) == h
    assert masks_hash(load_tensors(tiny_run / by["recover"]["artifacts"]["masks"]["path"])) == h  # unchanged by fine-tuning
    assert by["bake"]["metrics"]["baked_masks_hash"] == h


def test_variants(tiny_run):
    run = Run(tiny_run)
    v = run.variants()
    m = run.manifest
    by = {e["name"]: e for e in m["stages"]}
    assert set(v) == {"initial", "dense", "final", "train", "magnitude_prune", "recover", "bake", "export"}
    assert v["initial"] is not None and v["initial"] == m["initial"]
    assert v["dense"] == by["train"]  # the model just before the first pruning stage
    assert v["final"] == by["bake"] == v["export"]  # export does not change the model
    model, masks = run.load("magnitude_prune")
    assert masks and not model.training
    final, final_masks = run.load("final")
    assert final_masks == {}
    with pytest.raises(RunError, match="no variant 'best'"):
        run.load("best")


def test_run_refuses_a_non_run_directory(tmp_path):
    with pytest.raises(RunError, match="not a lotus run directory"):
        Run(tmp_path)


# ----------------------------------------------------------------------------- refusals and restarts


def test_existing_run_needs_resume_or_force(run_copy):
    with pytest.raises(RunError, match="already holds a run: add --resume to continue it, --rerun-from STAGE to redo part of it or --force to start over"):
        compress(parse_recipe(tiny_run_recipe_dict()), out=run_copy, quiet=True)


def test_resume_of_a_finished_run_reuses_everything(run_copy):
    before = read_json(run_copy / "manifest.json")
    compress(parse_recipe(tiny_run_recipe_dict()), out=run_copy, resume=True, quiet=True)
    after = read_json(run_copy / "manifest.json")
    assert after["stages"] == before["stages"] and after["initial"] == before["initial"]
    assert "resuming after 5 finished stage(s)" in (run_copy / "run.log").read_text()


def test_resume_ignores_bench_and_export_settings(run_copy):
    raw = tiny_run_recipe_dict()
    raw["bench"]["iters"] = 7
    compress(parse_recipe(raw), out=run_copy, resume=True, quiet=True)
    assert load_recipe(run_copy / "recipe.yaml").bench.iters == 7


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("stages.0.lr=0.01", "finished stage 1 (train) changed in the recipe"),
        ("stages.2.steps=5", "finished stage 3 (recover) changed in the recipe"),
        ("seed=1", "finished stage 1 (train) changed in the recipe"),
        ("data.eval_subset=50", "finished stage 1 (train) changed in the recipe"),
        ("model.img_size=40", "cannot resume"),
    ],
    ids=["first-stage", "later-stage", "seed", "data", "model"],
)
def test_resume_refuses_a_changed_recipe(run_copy, override, fragment):
    recipe = parse_recipe(tiny_run_recipe_dict(), overrides=[override])
    with pytest.raises(RunError, match="--force") as ei:
        compress(recipe, out=run_copy, resume=True, quiet=True)
    assert fragment in str(ei.value)


def test_resume_refuses_a_removed_stage(run_copy):
    raw = tiny_run_recipe_dict()
    raw["stages"].pop()  # drop export
    with pytest.raises(RunError, match=r"finished stage 5 \(export\) was removed"):
        compress(parse_recipe(raw), out=run_copy, resume=True, quiet=True)


@pytest.mark.parametrize(
    "target,action,fragment",
    [
        ("stages/01_train/model.safetensors", "flip", "model artifact stages/01_train/model.safetensors does not match its recorded sha256"),
        ("stages/02_magnitude_prune/masks.safetensors", "delete", "masks artifact stages/02_magnitude_prune/masks.safetensors is missing"),
        ("stages/01_train/history.csv", "append", "history artifact"),
        ("initial/model.safetensors", "flip", "initial model"),
    ],
    ids=["model-bytes", "masks-missing", "history-edited", "initial"],
)
def test_resume_refuses_tampered_artifacts(run_copy, target, action, fragment):
    f = run_copy / target
    if action == "delete":
        f.unlink()
    elif action == "append":
        f.write_text(f.read_text() + "1,2,3\n")
    else:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF  # one bit pattern in the last weight
        f.write_bytes(bytes(data))
    with pytest.raises(RunError, match="cannot resume") as ei:
        compress(parse_recipe(tiny_run_recipe_dict()), out=run_copy, resume=True, quiet=True)
    assert fragment in str(ei.value)


def test_force_starts_over(run_copy):
    old_created = read_json(run_copy / "manifest.json")["created"]
    raw = tiny_run_recipe_dict()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0]["steps"] = 2
    time.sleep(1.1)  # "created" has one-second resolution
    compress(parse_recipe(raw), out=run_copy, force=True, quiet=True)
    m = read_json(run_copy / "manifest.json")
    assert m["created"] != old_created
    assert [e["name"] for e in m["stages"]] == ["train"]
    assert m["stages"][0]["metrics"]["history"][-1]["step"] == 2


def test_resume_extends_a_shorter_run_to_the_same_result(tiny_run, tmp_path):
    """Run the first two stages, then resume with all of them: same masks and weights as one go."""
    out = tmp_path / "run"
    short = tiny_run_recipe_dict()
    short["stages"] = short["stages"][:2]
    compress(parse_recipe(short), out=out, quiet=True)
    first = read_json(out / "manifest.json")["stages"]
    compress(parse_recipe(tiny_run_recipe_dict()), out=out, resume=True, quiet=True)
    m = read_json(out / "manifest.json")
    assert m["stages"][:2] == first  # reused as they were
    assert all(e["status"] == "done" for e in m["stages"])
    assert bake_hash(out) == bake_hash(tiny_run)
    assert_same_weights(final_weights(out), final_weights(tiny_run))


# ----------------------------------------------------------------------------- kill -9, then --resume


def _compress_cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lotus_deploy.cli", "compress", str(recipe), "--out", str(out), "--quiet", *extra]


def _kill_when(proc: subprocess.Popen, manifest: Path, ready, deadline_s: float = 180.0) -> dict:
    """Poll manifest.json until ``ready(manifest_dict)``, then SIGKILL the process."""
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < deadline_s:
            if proc.poll() is not None:
                pytest.fail(f"compress exited (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]}")
            if manifest.is_file():
                m = json.loads(manifest.read_text())
                if ready(m):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(30)
                    return json.loads(manifest.read_text())
            time.sleep(0.01)
        pytest.fail("kill point not reached in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _done(m: dict) -> list[str]:
    return [e["name"] for e in m["stages"] if e["status"] == "done"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_point,ready",
    [
        ("after-first-stage", lambda m: len(_done(m)) >= 1),
        ("during-first-stage", lambda m: m["initial"] is not None and m["stages"][0]["status"] == "running"),
    ],
    ids=["after-first-stage", "during-first-stage"],
)
def test_killed_run_resumes_to_the_same_result(tiny_run, tmp_path, kill_point, ready):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_run_recipe_dict())
    out = tmp_path / "run"
    proc = subprocess.Popen(_compress_cmd(recipe, out), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = _kill_when(proc, out / "manifest.json", ready)
    assert proc.returncode == -signal.SIGKILL
    assert len(_done(killed)) < len(killed["stages"]), "the run finished before it could be killed"

    # Resume in this process (same single thread as the subprocess): saves a second interpreter start.
    res = CliRunner().invoke(main, ["compress", str(recipe), "--out", str(out), "--quiet", "--resume"])
    assert res.exit_code == 0, res.output
    m = read_json(out / "manifest.json")
    assert all(e["status"] == "done" for e in m["stages"])
    assert m["created"] == killed["created"]
    for before in killed["stages"]:
        if before["status"] == "done":  # finished stages were reused, not re-run
            assert m["stages"][before["index"]] == before
    assert f"resuming after {len(_done(killed))} finished stage(s)" in (out / "run.log").read_text()
    assert bake_hash(out) == bake_hash(tiny_run)
    assert_same_weights(final_weights(out), final_weights(tiny_run))


def test_cli_resume_refusals_exit_2(run_copy, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_run_recipe_dict())
    runner = CliRunner()
    r = runner.invoke(main, ["compress", str(recipe), "--out", str(run_copy), "--quiet"])
    assert r.exit_code == 2 and "already holds a run" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(main, ["compress", str(recipe), "--out", str(run_copy), "--quiet", "--resume", "--set", "stages.0.lr=0.01"])
    assert r.exit_code == 2
    assert "cannot resume" in r.stderr and "finished stage 1 (train) changed" in r.stderr and "Traceback" not in r.output
