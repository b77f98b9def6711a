"""lotus_deploy.bench.report: CSV, Markdown, the output folder, and comparisons of two results."""

from __future__ import annotations

import json

import pytest
from synthetic_bench import PNG, synthetic_results

from lotus_deploy.bench.report import (
    CSV_COLUMNS,
    compare,
    compare_markdown,
    report_markdown,
    results_csv,
    write_outputs,
)


@pytest.mark.parametrize("accuracy", [True, False], ids=["with-accuracy", "latency-only"])
def test_output_folder_written(tmp_path, accuracy):
    res = synthetic_results(accuracy=accuracy)
    paths = write_outputs(res, tmp_path)
    assert set(paths) == {"results_json", "results_csv", "report_md", "pareto_png", "sparsity_png"}
    assert all(p.parent == tmp_path and p.stat().st_size > 0 for p in paths.values())
    assert all(paths[k].read_bytes().startswith(PNG) for k in ("pareto_png", "sparsity_png"))
    csv_lines = paths["results_csv"].read_text().splitlines()
    assert len(csv_lines) == 1 + len(res.rows) and csv_lines[0] == ",".join(CSV_COLUMNS)
    md = paths["report_md"].read_text()
    for backend in ("torch_cpu", "onnxruntime_cpu"):
        for bs in (1, 8):
            assert f"### {backend}, batch {bs}" in md
    assert "`tensorrt` (skipped): no GPU here" in md and "efficiency" in md
    assert ("| ★ |" in md) == accuracy
    assert ("## Accuracy on each backend" in md) == accuracy


def test_results_csv_empty_cells_for_missing_values():
    rows = [r.model_dump() for r in synthetic_results(accuracy=False).rows]
    lines = results_csv(rows).splitlines()
    top1 = CSV_COLUMNS.index("top1")
    assert all(line.split(",")[top1] == "" for line in lines[1:])


def test_report_lists_failures():
    d = synthetic_results().model_dump()
    d["failures"] = [{"variant": "dense", "backend": "onnxruntime_cpu", "error": "prepare: RuntimeError: kaput"}]
    res = type(synthetic_results()).model_validate(d)
    assert "- `onnxruntime_cpu` on `dense`: prepare: RuntimeError: kaput" in report_markdown(res)


def test_compare_ratios_and_unmatched():
    a, b = synthetic_results(), synthetic_results(scale=2.0)
    b.rows = b.rows[:-1]  # one row only in A
    c = compare(a, b)
    assert c["summary"]["matched"] == len(a.rows) - 1
    assert all(r["median_ratio"] == pytest.approx(2.0) and r["images_per_s_ratio"] == pytest.approx(0.5) for r in c["rows"])
    assert all(r["top1_diff"] == 0 for r in c["rows"])
    assert c["summary"]["median_ratio_geomean"] == pytest.approx(2.0) and c["summary"]["within_10pct"] == 0
    assert c["only_a"] == [list((a.rows[-1].variant, a.rows[-1].backend, a.rows[-1].batch))] and c["only_b"] == []
    md = compare_markdown(c)
    assert "2.000" in md and "Only in A" in md


def test_compare_nothing_matched():
    a, b = synthetic_results(), synthetic_results()
    b.rows = []
    c = compare(a, b)
    assert c["summary"]["matched"] == 0 and c["summary"]["median_ratio_geomean"] is None
    assert "No rows match" in compare_markdown(c)


def test_cli_compare_two_result_files(tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    write_outputs(synthetic_results(), tmp_path / "a")
    write_outputs(synthetic_results(scale=1.05), tmp_path / "b")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "a" / "results.json"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    n = len(synthetic_results().rows)
    assert "1.050" in r.output and f"{n} of {n} within 10%" in r.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]["matched"] == n
    bad = CliRunner().invoke(main, ["bench", str(tmp_path / "a"), str(tmp_path / "cmp")])
    assert bad.exit_code == 2 and "no bench results" in bad.output
