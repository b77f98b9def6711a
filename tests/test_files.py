"""Atomic writes, file modes, strict JSON, the one CSV writer, path containment."""

from __future__ import annotations

import json
import math
import os

import pytest

from lotus_deploy.errors import InputError, RunError
from lotus_deploy.files import (
    atomic_path,
    csv_text,
    finite,
    inside,
    read_json,
    write_csv,
    write_json,
    write_text,
)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=["022", "077", "002"])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        p = write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == mode
    assert [q.name for q in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


def test_a_failed_write_leaves_the_old_file(tmp_path):
    p = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert p.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_json_is_strict(tmp_path):
    p = write_json(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    assert finite((1.0, math.nan)) == [1.0, None]


@pytest.mark.parametrize("data", [b"{\"a\": 1", b"\xff\xfe\x00garbage", b""], ids=["truncated", "binary", "empty"])
def test_read_json_names_the_file(tmp_path, data):
    p = tmp_path / "manifest.json"
    p.write_bytes(data)
    with pytest.raises(InputError, match=f"{p}: not valid JSON"):
        read_json(p)


def test_csv_one_writer():
    rows = [{"a": 1, "b": None, "c": [0.5, 0.25]}, {"a": 2, "d": "x"}]
    assert csv_text(rows) == "a,b,c,d\n1,,0.5000;0.2500,\n2,,,x\n"
    assert csv_text(rows, ["d", "a"]) == "d,a\n,1\nx,2\n"


def test_write_csv(tmp_path):
    p = write_csv(tmp_path / "h.csv", [{"epoch": 1, "loss": 0.5}])
    assert p.read_text() == "epoch,loss\n1,0.5\n"


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../x"], ids=["dotdot", "absolute", "nested-dotdot"])
def test_inside_refuses_paths_that_leave_the_root(tmp_path, rel):
    with pytest.raises(RunError, match="outside the run folder"):
        inside(tmp_path / "run", rel)


def test_inside_refuses_a_link_out(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path)
    with pytest.raises(RunError):
        inside(tmp_path / "run", "link/x")
    assert inside(tmp_path / "run", "stages/01_a") == (tmp_path / "run" / "stages" / "01_a").resolve()
