#!/usr/bin/env python3
"""Run the hostile-input corpus (tests/hostile/corpus.py) through the CLI and write the outcome table.

Writes ``benchmarks/results/hostile_inputs.md``: each input class, the exit code, whether a
traceback was printed, the number of stderr lines and the first line (temporary paths shown as
``<tmp>``). The same cases are asserted by ``tests/hostile/test_hostile_inputs.py``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "hostile"), str(ROOT / "tests")]

from corpus import CASES, WHAT, build, lotus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile_inputs.md")
    args = ap.parse_args()
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            work, cwd = Path(tmp) / "work", Path(tmp) / "cwd"
            work.mkdir()
            cwd.mkdir()
            argv = build(case, work)
            r = lotus(*argv, cwd=cwd)
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            # the error is the last line (a run that failed mid-stage logged its progress before it)
            first = (lines[-1] if lines else "").replace(tmp, "<tmp>").replace("|", "\\|")
            rows.append((case, WHAT[case], r.returncode, "Traceback" in r.stderr, len(lines), first[:160]))
            print(f"{case}: exit {r.returncode}", file=sys.stderr)
    ok = sum(1 for r in rows if r[2] == 2 and not r[3])
    md = [
        "# Hostile and malformed inputs through the CLI",
        "",
        f"Command: `python benchmarks/hostile_inputs.py` ({datetime.now(timezone.utc):%Y-%m-%d}, {platform.platform()}, "
        f"Python {platform.python_version()}). {ok} of {len(rows)} inputs end with exit code 2 and no traceback.",
        "",
        "| input | what | exit | traceback | stderr lines | the error (last line) |",
        "|---|---|---|---|---|---|",
    ]
    md += [f"| `{c}` | {w} | {e} | {'yes' if t else 'no'} | {n} | `{f}` |" for c, w, e, t, n, f in rows]
    args.out.write_text("\n".join(md) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
