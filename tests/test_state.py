"""RunState: seeds, lazily built data that writes nothing, stage metrics lookup, from_run."""

from __future__ import annotations

import logging
import random

import torch

from lotus_deploy.run import Run
from lotus_deploy.state import RunState


def make(tmp_path, recipe, model, index=1):
    return RunState(recipe=recipe, run_dir=tmp_path, device=torch.device("cpu"), model=model, masks={},
                    log=logging.getLogger("lotus.test"), stage_index=index)


def test_seed_depends_on_run_seed_and_stage_only(tmp_path, tiny_recipe, micro_model):
    s = make(tmp_path, tiny_recipe, micro_model)
    a = (s.seed(), random.random(), torch.rand(1).item())
    b = (s.seed(), random.random(), torch.rand(1).item())
    assert a == b
    assert make(tmp_path, tiny_recipe, micro_model, index=2).seed() != a[0]
    assert s.seed(offset=1) != a[0]


def test_reading_data_writes_nothing(tmp_path, tiny_recipe, micro_model):
    s = make(tmp_path, tiny_recipe, micro_model)
    assert not s.data_built
    assert len(s.data.train) == tiny_recipe.data.train_subset
    assert s.data_built and list(tmp_path.iterdir()) == []


def test_stage_metrics_latest_by_name_or_kind(tmp_path, tiny_recipe, micro_model):
    s = make(tmp_path, tiny_recipe, micro_model)
    s.manifest = {"stages": [
        {"name": "a", "kind": "finetune", "status": "done", "metrics": {"top1": 1}},
        {"name": "b", "kind": "finetune", "status": "done", "metrics": {"top1": 2}},
        {"name": "c", "kind": "finetune", "status": "failed", "metrics": {"top1": 3}},
    ]}
    assert s.stage_metrics("finetune") == {"top1": 2} and s.stage_metrics("a") == {"top1": 1}
    assert s.stage_metrics("bake") is None


def test_from_run_loads_the_variant(tiny_run):
    s = RunState.from_run(Run(tiny_run), "dense", quiet=True)
    ref, _ = Run(tiny_run).load("dense")
    assert all(torch.equal(a, b) for a, b in zip(s.model.state_dict().values(), ref.state_dict().values()))
    assert s.masks == {} and s.run_dir == tiny_run
