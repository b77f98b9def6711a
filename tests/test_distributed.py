"""lotus_deploy.distributed and the distributed runner: identity in one process; 2 gloo ranks for real.

The 2-process tests start PyTorch's own launchers (``python -m torch.distributed.run``, or two
processes with the env:// rendezvous variables) on the micro ViT and the digits data, one thread
each, with a short collective timeout so that a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, TINY_RECIPE, subprocess_env

from lotus_deploy import distributed as dist

TIMEOUT_S = 30  # collective timeout of the 2-process runs (LOTUS_DIST_TIMEOUT)


def fake_world(monkeypatch, rank: int, world: int) -> None:
    """Make this process believe it is ``rank`` of ``world`` (for the pure sharding helpers)."""
    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)


# ---- one process: every helper is the identity -------------------------------------------------


def test_helpers_are_the_identity_without_a_launch(monkeypatch):
    import torch

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    t = torch.arange(4.0)
    assert not dist.launched() and not dist.active() and dist.is_main()
    assert (dist.rank(), dist.world_size()) == (0, 1)
    assert dist.all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]
    assert dist.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]
    assert dist.shard(["a", "b", "c"]) == ["a", "b", "c"]
    assert dist.same_on_all_ranks({"w": t})
    assert dist.wrap_ddp(torch.nn.Linear(2, 2), torch.device("cpu")) is None
    assert dist.main_computes(lambda: 7, "a test") == 7


@pytest.mark.parametrize(("env", "expected"), [
    ({}, dist.World(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, dist.World(3, 4, 1)),
], ids=["no-launch", "torchrun-rank3-of-4"])
def test_world_comes_from_torchrun_variables(monkeypatch, env, expected):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dist.env_world() == expected
    assert dist.launched() == (expected.world_size > 1)


def test_a_rank_outside_the_world_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dist.RunError, match="outside WORLD_SIZE"):
        dist.env_world()


def test_tensors_hash_sees_names_values_and_dtypes():
    import torch

    a = {"w": torch.ones(3), "m": torch.tensor([True, False])}
    assert dist.tensors_hash(a) == dist.tensors_hash({k: v.clone() for k, v in a.items()})
    assert dist.tensors_hash(a) != dist.tensors_hash({**a, "w": torch.tensor([1.0, 1.0, 1.5])})
    assert dist.tensors_hash(a) != dist.tensors_hash({**a, "w": torch.ones(3, dtype=torch.float64)})
    assert dist.tensors_hash(a) != dist.tensors_hash({"v": a["w"], "m": a["m"]})


# ---- sharding: every job / eval image on exactly one rank ---------------------------------------


@pytest.mark.parametrize(("n", "world"), [(10, 2), (101, 2), (7, 3), (2, 4)], ids=["even", "odd-101-by-2", "7-by-3", "fewer-than-ranks"])
def test_shards_cover_every_index_exactly_once(monkeypatch, n, world):
    got: list[int] = []
    for r in range(world):
        fake_world(monkeypatch, r, world)
        got += list(dist.shard_indices(n))
        assert dist.shard(list(range(n))) == list(dist.shard_indices(n))
    assert sorted(got) == list(range(n))


@pytest.mark.parametrize("world", [2, 3], ids=["2-ranks", "3-ranks"])
def test_sharded_eval_loader_has_each_image_once(monkeypatch, world):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lotus_deploy.data import shard_eval_loader

    ds = TensorDataset(torch.arange(101).float()[:, None], torch.arange(101))  # label = index
    seen: list[int] = []
    for r in range(world):
        fake_world(monkeypatch, r, world)
        shard = shard_eval_loader(DataLoader(ds, batch_size=8))
        seen += [int(i) for _, y in shard for i in y]
    assert sorted(seen) == list(range(101))


def test_shuffled_loaders_and_plain_iterables_are_not_sharded():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lotus_deploy.data import shard_eval_loader

    ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    assert shard_eval_loader(DataLoader(ds, batch_size=2, shuffle=True)) is None
    assert shard_eval_loader([(torch.zeros(1, 1), torch.zeros(1))]) is None


@pytest.mark.parametrize(("batch", "world", "per_rank"), [(32, 1, 32), (32, 2, 16), (96, 4, 24)], ids=["1", "2", "4"])
def test_per_rank_batch_splits_the_global_batch(monkeypatch, batch, world, per_rank):
    from lotus_deploy.data import per_rank_batch

    fake_world(monkeypatch, 0, world)
    assert per_rank_batch(batch) == per_rank


def test_a_batch_not_divisible_by_the_world_is_refused_in_one_line(monkeypatch):
    from lotus_deploy.data import per_rank_batch

    fake_world(monkeypatch, 0, 3)
    with pytest.raises(dist.RunError, match="batch size 32 is not divisible by the world size 3"):
        per_rank_batch(32)


def test_top1_loop_summed_over_shards_equals_the_whole_split():
    from lotus_deploy.metrics import TopK, top1_loop

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(37, 10)).astype(np.float32), rng.integers(0, 10, 37)
    whole = top1_loop({"m": lambda x: x}, [(logits, labels)])["m"]
    other = TopK()
    other.add(logits[1::2], labels[1::2])
    mine = top1_loop({"m": lambda x: x}, [(logits[0::2], labels[0::2])],
                     reduce=lambda v: [a + b for a, b in zip(v, other.counts())])["m"]
    assert mine["images"] == 37
    for k in ("top1", "top5", "loss"):
        assert mine[k] == pytest.approx(whole[k], rel=1e-9), k


# ---- 2 gloo processes ----------------------------------------------------------------------------


def _tiny_training(rank: int | None, world: int = 2, port: int = 0, out: str = "", forward: bool = True):
    """3 AdamW steps of a small MLP on 6 images per rank (``rank`` None: all ranks' images in one
    process), through :func:`lotus_deploy.train.train` and, with ``forward``, a custom forward."""
    import torch

    from lotus_deploy.train import TrainSpec, train

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ranks = range(world) if rank is None else [rank]
    gens = [torch.Generator().manual_seed(100 + r) for r in ranks]
    x = torch.cat([torch.randn(6, 4, generator=g) for g in gens])  # (6 per rank, 4)
    y = torch.cat([torch.randint(0, 3, (6,), generator=g) for g in gens])
    scale = torch.full((len(x), 1), 2.0)
    batches = [(x, y, scale)] if forward else [(x, y)]
    train(model, TrainSpec(steps=3, lr=0.05, warmup=0), lambda e: batches, 1, torch.device("cpu"),
          forward=(lambda xb, s: model(xb * s)) if forward else None, log=lambda m: None)
    return model


def _ddp_worker(rank: int, world: int, port: int, out: str, forward: bool) -> None:
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOTUS_DIST_TIMEOUT=str(TIMEOUT_S))
    with dist.session(torch.device("cpu")):
        model = _tiny_training(rank, world, forward=forward)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("forward", [
    pytest.param(False, id="model-forward", marks=pytest.mark.slow),  # the pipeline tests below train this way too
    pytest.param(True, id="custom-forward"),
])
def test_ddp_training_equals_one_process_on_the_whole_batch(tmp_path, forward):
    """Two ranks with 6 images each train like one process on the 12 (gradients averaged by DDP,
    also through a custom forward over the model, as token dropping uses)."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), forward), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert dist.tensors_hash(r0) == dist.tensors_hash(r1)
    whole = _tiny_training(None, forward=forward).state_dict()
    for k in whole:
        torch.testing.assert_close(r0[k], whole[k], rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_recipe_file(tmp_path: Path) -> Path:
    r = json.loads(json.dumps(TINY_RECIPE))
    r["data"]["eval_subset"] = 101  # odd: each rank evaluates a different number of images
    r["stages"].insert(3, {"kind": "evaluate"})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def env2(**extra) -> dict:
    env = {**subprocess_env(), "LOTUS_DIST_TIMEOUT": str(TIMEOUT_S), "OMP_WAIT_POLICY": "PASSIVE"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return {**env, **extra}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "lotus_deploy", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env2(), cwd=cwd, timeout=4 * TIMEOUT_S, check=False)


WORKER = """
import os, sys
import lotus_deploy.train as t

if os.environ["RANK"] == "1":  # rank 1 breaks in the stage named LOTUS_TEST_FAIL_STAGE
    real = t.train

    def train(*a, desc="train", **k):
        if desc == os.environ["LOTUS_TEST_FAIL_STAGE"]:
            if os.environ["LOTUS_TEST_FAIL"] == "exit":
                os._exit(3)
            raise RuntimeError("boom on rank 1")
        return real(*a, desc=desc, **k)

    t.train = train
from lotus_deploy.cli import main
main(sys.argv[1:], prog_name="lotus")
"""


def two_plain_processes(tmp_path: Path, args: list[str], **extra) -> list[subprocess.CompletedProcess]:
    """Ranks 0 and 1 as two plain processes with torch's env:// rendezvous variables (no agent that
    kills the survivors: they must stop by themselves)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = str(free_port())
    (tmp_path / "tmp").mkdir(exist_ok=True)  # a killed rank leaves its scratch folder here, not in /tmp
    extra["TMPDIR"] = str(tmp_path / "tmp")
    procs = [
        subprocess.Popen([sys.executable, str(worker), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=env2(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra))
        for r in range(2)
    ]
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=4 * TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung instead of stopping")
        out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return out


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """The tiny recipe (finetune, magnitude_prune, finetune, evaluate, bake) under torchrun, 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = tiny_recipe_file(tmp)
    p = torchrun("compress", str(recipe), "--out", str(tmp / "run"), cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run", p


def test_two_ranks_write_one_run_with_identical_masks(run2):
    run_dir, p = run2
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [e["status"] for e in m["stages"]] == ["done"] * 5
    for e in m["stages"]:
        assert e["ranks"]["world_size"] == 2 and e["ranks"]["identical"], e["name"]
    pruned = m["stages"][1]
    assert pruned["ranks"]["masks_hash"] == pruned["metrics"]["masks_hash"]  # rank 0's masks, the same on rank 1
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert "world_size: 2" in (run_dir / "recipe.yaml").read_text()
    assert p.stdout.count("run: ") == 1


def test_two_ranks_evaluate_every_image_exactly_once(run2):
    run_dir, _ = run2
    m = json.loads((run_dir / "manifest.json").read_text())
    ev = next(e for e in m["stages"] if e["kind"] == "evaluate")
    assert ev["metrics"]["images"] == 101  # 51 on rank 0 + 50 on rank 1, no image padded in twice


def test_two_ranks_log_every_line_once(run2):
    run_dir, p = run2
    log = [line.split(" ", 3)[-1] for line in (run_dir / "run.log").read_text().splitlines()]
    assert log and len(log) == len(set(log)), [x for x in log if log.count(x) > 1][:3]
    console = [x for x in p.stderr.splitlines() if x.startswith("[") and "/5]" in x]
    assert len(console) == len(set(console)) == 10  # start and end of 5 stages, from rank 0 only


@pytest.mark.parametrize(("how", "message"), [
    pytest.param("exit", "another rank died or did not answer", id="rank-1-dies"),
    pytest.param("raise", "RuntimeError: boom on rank 1", marks=pytest.mark.slow, id="rank-1-raises"),
])
def test_a_failing_rank_stops_the_other_with_a_clear_error_then_resume_finishes(tmp_path, how, message):
    recipe = tiny_recipe_file(tmp_path)
    run_dir = tmp_path / "run"
    r0, r1 = two_plain_processes(tmp_path, ["compress", str(recipe), "--out", str(run_dir)], LOTUS_TEST_FAIL=how, LOTUS_TEST_FAIL_STAGE="recover")
    assert r0.returncode == 2, r0.stderr[-2000:]
    assert r1.returncode != 0
    errors = [x for x in r0.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "rank 0 stops:" in errors[0] and message in errors[0], r0.stderr[-2000:]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [e["status"] for e in m["stages"][:3]] == ["done", "done", "failed"]
    assert message in m["stages"][2]["error"]
    if how == "raise":
        return
    kept = [e["ended"] for e in m["stages"][:2]]
    p = torchrun("compress", str(recipe), "--out", str(run_dir), "--resume", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((run_dir / "manifest.json").read_text())
    assert [e["status"] for e in m["stages"]] == ["done"] * 5
    assert [e["ended"] for e in m["stages"][:2]] == kept  # finished stages were not run again
    assert all(e["ranks"]["identical"] for e in m["stages"][2:])


def test_python_m_lotus_deploy_is_the_cli():
    p = subprocess.run([sys.executable, "-m", "lotus_deploy", "--help"], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, check=False)
    assert p.returncode == 0 and "compress" in p.stdout


@pytest.mark.slow
def test_a_batch_size_the_world_cannot_split_stops_every_rank(tmp_path):
    r = json.loads(json.dumps(TINY_RECIPE))
    r["data"]["batch_size"] = 33
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(yaml.safe_dump(r))
    p = torchrun("compress", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert p.returncode != 0
    errors = sorted(x for x in p.stderr.splitlines() if "error:" in x)
    assert len(errors) == 2, errors
    assert errors[0].startswith("[rank 1] error: rank 1 stops: rank 0 could not open the run folder")
    assert errors[1].startswith("error: batch size 33 (data.batch_size, stage train, stage recover) is not divisible by the world size 2")
    assert not (tmp_path / "run" / "manifest.json").exists()
