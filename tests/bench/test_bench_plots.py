"""lotus_deploy.bench.plots: the Pareto and sparsity figures are written as PNG files."""

from __future__ import annotations

import pytest
from synthetic_bench import PNG, synthetic_results

from lotus_deploy.bench.plots import plot_pareto, plot_sparsity


@pytest.mark.parametrize("plot", [plot_pareto, plot_sparsity], ids=["pareto", "sparsity"])
@pytest.mark.parametrize("accuracy", [True, False], ids=["with-accuracy", "latency-only"])
def test_plot_writes_a_png(tmp_path, plot, accuracy):
    out = plot(synthetic_results(accuracy=accuracy), tmp_path / "sub" / "fig.png")
    assert out == tmp_path / "sub" / "fig.png"
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["fig.png"]  # written atomically: no temporary file left


def test_pareto_plot_of_results_without_rows(tmp_path):
    res = synthetic_results()
    res.rows = []
    assert plot_pareto(res, tmp_path / "empty.png").read_bytes().startswith(PNG)

