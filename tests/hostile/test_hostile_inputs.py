"""A corpus of malformed and hostile inputs through the real CLI (a subprocess, as a user runs it).

Each case asserts: exit code 2, no traceback, at most a few lines on stderr, nothing written
outside the run folder, and nothing pre-existing changed (a snapshot of the case's folder,
except the run folder the case may create).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import CASES, build, lotus, snapshot

pytestmark = pytest.mark.slow  # ~30 subprocesses of the CLI


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_exits_2_with_a_clear_line(case, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args = build(case, work)
    before = snapshot(work)
    outside_before = snapshot(tmp_path / "cwd") if (tmp_path / "cwd").exists() else {}
    (tmp_path / "cwd").mkdir(exist_ok=True)
    r = lotus(*args, cwd=tmp_path / "cwd")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert 1 <= len(lines) <= 6, lines
    assert all(len(ln) < 600 for ln in lines), lines
    after = {k: v for k, v in snapshot(work).items() if not k.startswith("run/")}
    assert after == before, "a pre-existing file changed or a file appeared outside the run folder"
    assert snapshot(tmp_path / "cwd") == outside_before, "something was written into the working directory"
    assert not Path("/tmp/victim").exists()
    assert not (tmp_path / "cwd" / "PWNED").exists() and not (work / "PWNED").exists()
