"""The runner under misuse: writes stay in the run folder, one writer at a time, --force clears,
--rerun-from keeps what it says, failures are recorded (full disk too), collapses and NaN fail."""

from __future__ import annotations

import copy
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_RECIPE, subprocess_env

from lotus_deploy.errors import RunError
from lotus_deploy.files import read_json
from lotus_deploy.pipeline import compress, run_lock
from lotus_deploy.recipe import RecipeError, parse_recipe


def tiny(**changes) -> dict:
    raw = copy.deepcopy(TINY_RECIPE)
    raw["stages"] = raw["stages"][:2]  # train + prune: fast
    raw.update(changes)
    return raw


def test_stage_name_cannot_leave_the_run_folder(tmp_path):
    raw = tiny()
    raw["stages"][0]["name"] = "x/../../../../tmp/victim"
    with pytest.raises(RecipeError, match="stages: .*name"):
        parse_recipe(raw)


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "a\\b", ""], ids=["dotdot", "dot", "slash", "backslash", "empty"])
def test_stage_names_are_folder_safe(name):
    raw = tiny()
    raw["stages"][0]["name"] = name
    with pytest.raises(RecipeError):
        parse_recipe(raw)


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom lotus_deploy.pipeline import run_lock\n"
        f"with run_lock(Path({str(run_dir)!r})):\n    print('locked', flush=True)\n    time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"in use by another lotus process \\(pid {holder.pid}\\)"):
            compress(parse_recipe(tiny()), out=run_dir, quiet=True)
        assert not (run_dir / "manifest.json").exists() and not (run_dir / "recipe.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # released when the holder died
        pass


def test_out_refuses_a_foreign_folder_before_writing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not a lotus run folder"):
        compress(parse_recipe(tiny()), out=out, quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_missing_weights_fail_before_the_first_byte(tmp_path):
    raw = tiny()
    raw["model"]["weights"] = str(tmp_path / "absent.safetensors")
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match="model.weights: no such file"):
        compress(parse_recipe(raw), out=out, quiet=True)
    assert not out.exists()


def test_resume_with_no_run_is_refused(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        compress(parse_recipe(tiny()), out=tmp_path / "none", resume=True, quiet=True)


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory) -> Path:
    return compress(parse_recipe(tiny()), out=tmp_path_factory.mktemp("runs") / "two", quiet=True)


def test_force_removes_what_the_old_run_wrote(two_stage_run, tmp_path):
    run = Path(shutil.copytree(two_stage_run, tmp_path / "run"))
    stale = run / "stages" / "09_old"
    stale.mkdir(parents=True)
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(b"old")
    compress(parse_recipe(tiny()), out=run, force=True, quiet=True)
    assert not stale.exists() and not (run / "export").exists()
    assert read_json(run / "manifest.json")["stages"][-1]["status"] == "done"


def test_rerun_from_keeps_earlier_stages_and_reruns_the_rest(two_stage_run, tmp_path):
    run = Path(shutil.copytree(two_stage_run, tmp_path / "run"))
    before = read_json(run / "manifest.json")
    raw = tiny()
    raw["stages"][1]["sparsity"] = 0.6  # a changed stage: --resume refuses, --rerun-from goes on
    with pytest.raises(RunError, match="--rerun-from magnitude_prune"):
        compress(parse_recipe(raw), out=run, resume=True, quiet=True)
    compress(parse_recipe(raw), out=run, rerun_from="magnitude_prune", quiet=True)
    after = read_json(run / "manifest.json")
    assert after["stages"][0] == before["stages"][0]  # kept as it was, fingerprint and all
    assert after["rerun_from"]["kept"] == [before["stages"][0]["fingerprint"]]
    assert after["stages"][1]["fingerprint"] != before["stages"][1]["fingerprint"]
    assert after["stages"][1]["metrics"]["scope_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_rerun_from_an_unknown_stage(two_stage_run, tmp_path):
    run = Path(shutil.copytree(two_stage_run, tmp_path / "run"))
    with pytest.raises(RunError, match="no such stage; stages: train, magnitude_prune"):
        compress(parse_recipe(tiny()), out=run, rerun_from="nope", quiet=True)


def test_nan_loss_fails_the_stage_and_keeps_json_strict(tmp_path):
    raw = tiny()
    raw["stages"] = [{"kind": "finetune", "name": "train", "steps": 6, "lr": 1e6, "warmup": 0}]
    out = tmp_path / "run"
    with pytest.raises(Exception, match="(?i)non-finite|not a finite"):
        compress(parse_recipe(raw), out=out, quiet=True)
    text = (out / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    m = read_json(out / "manifest.json")
    assert m["stages"][0]["status"] == "failed"
    assert not (out / "stages" / "01_train" / "model.safetensors").exists()  # no NaN weights written


def test_collapse_to_chance_fails_with_advice(tmp_path):
    from lotus_deploy.pipeline import check_stage_result

    r = parse_recipe(tiny())
    cfg = r.stages[0]
    with pytest.raises(RunError, match="collapsed: top-1 11.00% \\(chance 10.0%\\) after entering at 84.30%"):
        check_stage_result(r, cfg, {"top1": 11.0}, entering=84.3)
    check_stage_result(r, cfg, {"top1": 11.0}, entering=12.0)  # never was above chance: no collapse
    check_stage_result(r, cfg, {"top1": 70.0}, entering=84.3)  # a drop, not a collapse
    r.guard.enabled = False
    check_stage_result(r, cfg, {"top1": 11.0}, entering=84.3)


def test_full_disk_marks_the_stage_failed(tmp_path, monkeypatch):
    """The reserve file is given back so the manifest can say 'failed' when writes hit ENOSPC."""
    import lotus_deploy.pipeline as P

    real = P.save_checkpoint

    def full(state, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.safetensors"))

    monkeypatch.setattr(P, "save_checkpoint", lambda s, d: real(s, d) if d.name == "initial" else full(s, d))
    out = tmp_path / "run"
    with pytest.raises(OSError):
        compress(parse_recipe(tiny()), out=out, quiet=True)
    m = read_json(out / "manifest.json")
    assert m["stages"][0]["status"] == "failed" and "No space left" in m["stages"][0]["error"]
    assert not (out / ".reserve").exists()


def test_written_files_honour_the_umask(tmp_path):
    from lotus_deploy.files import write_text

    old = os.umask(0o022)
    try:
        p = write_text(tmp_path / "config.pbtxt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o644


def test_cli_compress_bad_inputs_exit_2_with_one_line(tmp_path):
    raw = tiny()
    raw["data"] = {"kind": "imagefolder", "root": str(tmp_path / "nope")}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "lotus_deploy.cli", "compress", str(recipe), "--out", str(out)],
                       capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"{recipe}: data.root: no such folder: {tmp_path / 'nope'}"]
    assert not out.exists()


def test_a_relative_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny()
    raw["stages"] += [{"kind": "bake"}, {"kind": "export"}]  # stages whose artifacts sit under RUN/, not the stage folder
    run = compress(parse_recipe(raw), out="runs/rel", quiet=True)
    m = read_json(run / "manifest.json")
    assert m["stages"][-1]["status"] == "done"
    assert all(not Path(a["path"]).is_absolute() for e in m["stages"] for a in e["artifacts"].values())


def test_a_read_only_run_folder_is_refused_before_writing(two_stage_run, tmp_path, monkeypatch):
    """As root (CI) chmod does not stop writes, so the permission answer is simulated: the runner
    asks os.access and refuses with one line before touching the folder."""
    import lotus_deploy.pipeline as P

    run = Path(shutil.copytree(two_stage_run, tmp_path / "run"))
    before = sorted(p.name for p in run.iterdir())
    monkeypatch.setattr(P.os, "access", lambda path, mode: False)
    with pytest.raises(RunError, match="is not writable"):
        compress(parse_recipe(tiny()), out=run, force=True, quiet=True)
    assert sorted(p.name for p in run.iterdir()) == before
