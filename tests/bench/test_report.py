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


def test_precision_section_ratios_and_unmeasured():
    from synthetic_bench import row

    from lotus_deploy.bench.report import cpu_int8_line, precision_lines

    d = synthetic_results().model_dump()
    d["backends"] += [
        {"name": "onnxruntime_cpu_int8", "description": "", "device": "cpu", "precision": "int8", "family": "onnxruntime_cpu", "status": "measured"},
        {"name": "tensorrt_int8", "description": "", "device": "cuda", "precision": "int8", "family": "tensorrt", "status": "skipped", "reason": "no GPU here"},
    ]
    d["backends"][1]["family"] = "onnxruntime_cpu"
    d["rows"] += [row("dense", "onnxruntime_cpu_int8", 1, 3.0, 79.0), row("dense", "onnxruntime_cpu_int8", 8, 3.0 * 8 ** 0.5, 79.0)]
    d["accuracy"].append({"variant": "dense", "backend": "onnxruntime_cpu_int8", "top1": 79.0, "images": 100, "agreement": 0.97,
                          "max_abs_logit_diff": 0.1, "seconds": 0.1})
    d["environment"]["cpu_int8"] = {"vnni": ["avx512_vnni"], "amx": []}
    res = type(synthetic_results()).model_validate(d)
    text = "\n".join(precision_lines(res))
    assert "### onnxruntime_cpu" in text and "### torch_cpu" not in text  # one precision only: no table
    assert "| dense | fp32 | onnxruntime_cpu | 80.00 | 100.00 | 6.00 | 16.97 |" in text
    assert "| dense | int8 | onnxruntime_cpu_int8 | 79.00 | 97.00 | 3.00 (0.50x) | 8.49 (0.50x) |" in text
    assert "- `tensorrt_int8` (int8) not measured: no GPU here" in text
    md = report_markdown(res)
    assert "## Precisions" in md and "- CPU int8 instructions: VNNI avx512_vnni; AMX none (ONNX Runtime's int8 kernels use VNNI)" in md
    assert precision_lines(synthetic_results()) == []  # nothing of the kind measured or asked for
    assert "neither" in cpu_int8_line({"vnni": [], "amx": []})
    assert cpu_int8_line({"vnni": ["avx512_vnni"], "amx": ["amx_int8", "amx_tile"]}).endswith("use VNNI and AMX)")
