"""lotus_deploy.bench.results: the versioned results.json schema and its reader."""

from __future__ import annotations

import json

import pytest
from synthetic_bench import synthetic_results

from lotus_deploy.bench.report import write_outputs
from lotus_deploy.bench.results import (
    RESULTS_FORMAT,
    RESULTS_VERSION,
    ResultsError,
    load_results,
    results_path,
)
from lotus_deploy.errors import RunError


def test_results_schema_round_trip(tmp_path):
    res = synthetic_results()
    write_outputs(res, tmp_path)
    back = load_results(tmp_path)  # a bench folder
    assert back == res
    assert load_results(tmp_path / "results.json").model_dump(mode="json") == res.model_dump(mode="json")
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["format"] == RESULTS_FORMAT and raw["version"] == RESULTS_VERSION == 2


@pytest.mark.parametrize("where", ["file", "bench-dir", "run-dir"])
def test_results_path_finds_the_file(tmp_path, where):
    f = tmp_path / "bench" / "results.json"
    f.parent.mkdir()
    f.write_text("{}")
    given = {"file": f, "bench-dir": f.parent, "run-dir": tmp_path}[where]
    assert results_path(given) == f


@pytest.mark.parametrize(
    "mutate, match",
    [
        pytest.param(lambda d: d.pop("format"), "not a lotus bench results file", id="no-format"),
        pytest.param(lambda d: d.update(version=1), "results version 1", id="old-version"),
        pytest.param(lambda d: d["rows"][0].pop("latency_median_ms"), "does not match the results schema", id="missing-field"),
        pytest.param(lambda d: d.update(extra=1), "does not match the results schema", id="unknown-field"),
    ],
)
def test_load_results_rejects_bad_files(tmp_path, mutate, match):
    d = synthetic_results().model_dump(mode="json")
    mutate(d)
    (tmp_path / "results.json").write_text(json.dumps(d))
    with pytest.raises(ResultsError, match=match):
        load_results(tmp_path / "results.json")


def test_load_results_not_json(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ResultsError, match="is not JSON"):
        load_results(tmp_path)


def test_load_results_missing_says_what_to_do(tmp_path):
    with pytest.raises(ResultsError, match="lotus bench RUN") as e:
        load_results(tmp_path)
    assert isinstance(e.value, RunError)  # the CLI reports it as a user error
