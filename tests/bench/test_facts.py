"""lotus_deploy.bench.facts: model facts, variants of a run, sweep efficiency, the environment."""

from __future__ import annotations

import pytest
import torch

from lotus_deploy.bench.facts import (
    bench_environment,
    model_facts,
    resolve_variants,
    sweep_efficiency,
)
from lotus_deploy.errors import RunError
from lotus_deploy.run import Run


def _two_four_first_layer() -> torch.nn.Sequential:
    """Three Linears: the first 2:4 along in_features (32), the others zero but not eligible (K 8, 20)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 16), torch.nn.Linear(20, 8))
    with torch.no_grad():
        g = m[0].weight.view(8, 8, 4)  # (out, groups, 4): zero the 2 smallest of every group of 4
        g.scatter_(-1, g.abs().argsort(-1)[..., :2], 0.0)
        m[1].weight.zero_()  # in_features 8 is not a multiple of 16: not eligible for sparse kernels
        m[2].weight.zero_()  # in_features 20: not eligible either
    return m


def test_model_facts_counts_sparsity_and_two_four_layers():
    m = _two_four_first_layer()
    f = model_facts(m, scope=["0", "1"])
    params = sum(p.numel() for p in m.parameters())
    assert f["params"] == params and f["linear_layers"] == 3 and f["scope"] == ["0", "1"]
    assert f["scope_params"] == 32 * 8 + 8 * 16
    assert f["scope_nonzeros"] == 32 * 8 // 2 and f["scope_sparsity"] == pytest.approx(1 - 128 / 384)
    assert f["nonzeros"] == params - (32 * 8 // 2 + 8 * 16 + 20 * 8) and 0 < f["sparsity"] < 1
    assert f["two_four_layers"] == 1 and f["two_four_layer_names"] == ["0"]
    with torch.no_grad():
        m[0].weight[0, :4] = 1.0  # one group of 4 fully dense: no longer 2:4
    assert model_facts(m, scope=["0"])["two_four_layer_names"] == []


def test_model_facts_default_scope_is_the_block_linears(micro_model):
    f = model_facts(micro_model)
    assert f["scope"] and 0 < f["scope_params"] < f["params"] and f["scope_sparsity"] == 0.0


def test_sweep_efficiency_from_manifest():
    manifest = {"stages": [
        {"name": "sweep", "kind": "essential_sparsity", "status": "done", "wall_s": 30.0,
         "metrics": {"evaluations": 11, "sweep_wall_s": 22.0, "cost_ratio": 1.02, "table": [{}] * 10}},
        {"name": "sweep2", "kind": "essential_sparsity", "status": "done", "wall_s": 5.0, "metrics": {}},
        {"name": "sweep3", "kind": "essential_sparsity", "status": "failed", "wall_s": 5.0, "metrics": {}},
        {"name": "ft", "kind": "finetune", "status": "done", "wall_s": 5.0, "metrics": {"points": 3}},
    ]}
    out = sweep_efficiency(manifest, eval_images=100, forward_images_per_s=50.0)
    assert [s["stage"] for s in out] == ["sweep", "sweep2"]
    assert out[0]["points"] == 11 and out[0]["ideal_s"] == pytest.approx(22.0) and out[0]["ratio"] == pytest.approx(1.0)
    assert out[0]["wall_s"] == 22.0 and out[0]["stage_cost_ratio"] == 1.02
    assert out[1]["ratio"] is None and "do not say" in out[1]["note"]


def test_bench_environment_threads_and_providers():
    env = bench_environment(3)
    assert env["bench_threads"] == 3 and env["torch_interop_threads"] >= 1
    assert "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert env["torch"] == torch.__version__


@pytest.mark.slow
def test_resolve_variants_all_and_aliases(tiny_run):
    run = Run(tiny_run)
    vs = resolve_variants(run, ["all"])
    names = [v["name"] for v in vs]
    assert names[0] == "initial" and "magnitude_prune" in names and "recover" in names
    shas = [v["entry"]["artifacts"]["model"]["sha256"] for v in vs]
    assert len(set(shas)) == len(shas)  # one entry per distinct checkpoint
    aliases = {a: v["name"] for v in vs for a in v["aliases"]}
    assert aliases["dense"] == "train" and aliases["final"] in names
    one = resolve_variants(run, ["dense", "train"])
    assert [(v["name"], v["aliases"]) for v in one] == [("dense", ["train"])]
    with pytest.raises(RunError, match="no variant 'nope'"):
        resolve_variants(run, ["nope"])


def test_cpu_int8_flags():
    from lotus_deploy.bench.facts import cpu_int8_flags

    text = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8 avx_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert cpu_int8_flags(text) == {"vnni": ["avx512_vnni", "avx_vnni"], "amx": ["amx_bf16", "amx_int8", "amx_tile"]}
    assert cpu_int8_flags("") == {"vnni": [], "amx": []}
    here = cpu_int8_flags()  # this machine's /proc/cpuinfo (empty lists where there is none)
    assert set(here) == {"vnni", "amx"} and all(isinstance(v, list) for v in here.values())
