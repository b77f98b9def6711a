"""instant_soup and lottery_finetune under torchrun: 2 gloo ranks against one process.

The 2-rank runs start ``python -m torch.distributed.run`` on a small worker script that runs
the CLI with a few functions wrapped to note, in a shared log file, which rank ran each soup
learner, scored how many images for the ticket tables and wrote which tensor files. The micro
ViT (trained from its seeded initialization, no stage before the tested one trains, so the
weights entering it are the same in both runs) and the digits data keep each run to seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE
from test_distributed import TIMEOUT_S, env2, free_port

WORKER = """
import os, sys

import lotus_deploy.files as files
import lotus_deploy.prune.tickets as tickets
import lotus_deploy.stages.soup as soup

RANK = os.environ["RANK"]


def note(line):
    with open(os.environ["LOTUS_TEST_LOG"], "a") as f:
        f.write(f"{RANK} {line}\\n")


def noting(module, name, line):
    real = getattr(module, name)

    def wrapped(*a, **k):
        note(line(*a, **k))
        return real(*a, **k)

    setattr(module, name, wrapped)


noting(files, "save_tensors", lambda path, *a, **k: f"wrote {os.path.basename(str(path))}")
noting(soup, "train_learner", lambda job: f"learner {job.round} {job.learner}")
noting(tickets, "score_images", lambda model, x, *a, **k: f"scored {x.shape[0]}")
noting(tickets, "hierarchical_tickets", lambda model, x, *a, **k: f"scored {x.shape[0]}")
crash = os.environ.get("LOTUS_TEST_CRASH_ROUND")
if crash is not None:  # every rank stops at the start of that round (0-based)
    real_round = soup.play_round

    def play_round(ctx, r, current):
        if r == int(crash):
            raise RuntimeError(f"simulated crash in round {r + 1}")
        return real_round(ctx, r, current)

    soup.play_round = play_round
from lotus_deploy.cli import main
main(sys.argv[1:], prog_name="lotus")
"""


def recipe_file(tmp: Path, data: dict, stages: list[dict]) -> Path:
    r = json.loads(json.dumps(TINY_RECIPE))
    r["data"].update(data)
    r["stages"] = stages
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def torchrun2(tmp: Path, recipe: Path, out: Path, *flags: str, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """``lotus compress`` on 2 gloo ranks through the noting worker; (process, the log's lines as [rank, words...])."""
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    log = tmp / f"{out.name}.log"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), "compress", str(recipe), "--out", str(out), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=6 * TIMEOUT_S, check=False,
                       env=env2(LOTUS_TEST_LOG=str(log), **env))
    return p, [line.split() for line in log.read_text().splitlines()] if log.is_file() else []


def one_process(recipe: Path, out: Path) -> Path:
    from lotus_deploy.pipeline import compress
    from lotus_deploy.recipe import load_recipe

    return compress(load_recipe(recipe), out=out, quiet=True)


def entries(run: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((run / "manifest.json").read_text())["stages"]}


def writes(log: list[list[str]], name_start: str) -> Counter:
    """(rank, file name) -> how often it was written, for tensor files whose name starts with ``name_start``."""
    return Counter((r, w[1]) for r, *w in log if w[0] == "wrote" and w[1].startswith(name_start))


# ---- instant_soup ----------------------------------------------------------------------------------

SOUP_DATA = {"eval_subset": 101}  # odd: the ranks evaluate 51 and 50 images
SOUP = {"kind": "instant_soup", "sparsity": 0.6, "learners": 3, "data_fraction": 0.2, "step": 0.2, "finetune_steps": 2,
        "eval_images": 41}


@pytest.fixture(scope="module")
def soup_runs(tmp_path_factory):
    """The soup after a magnitude prune (no training before it), on 2 ranks and in one process."""
    tmp = tmp_path_factory.mktemp("soup")
    recipe = recipe_file(tmp, SOUP_DATA, [{"kind": "magnitude_prune", "sparsity": 0.2}, SOUP])
    p, log = torchrun2(tmp, recipe, tmp / "run2")
    assert p.returncode == 0, p.stderr[-3000:]
    return {"two": tmp / "run2", "one": one_process(recipe, tmp / "run1"), "log": log, "proc": p, "tmp": tmp, "recipe": recipe}


def test_soup_learners_are_spread_over_the_ranks(soup_runs):
    ran = [(r, int(rnd), int(j)) for r, what, rnd, j in (x for x in soup_runs["log"] if x[1] == "learner")]
    assert sorted((rnd, j) for _, rnd, j in ran) == [(rnd, j) for rnd in range(3) for j in range(3)]  # each job once
    assert {(rnd, j): int(r) for r, rnd, j in ran} == {(rnd, j): j % 2 for rnd in range(3) for j in range(3)}  # jobs r, r + 2, ...
    rounds = entries(soup_runs["two"])["instant_soup"]["metrics"]["rounds"]
    assert [r["learner_ranks"] for r in rounds] == [[0, 1, 0]] * 3
    assert all(len(r["learner_s"]) == 3 and len(r["learner_top1"]) == 3 for r in rounds)  # gathered from both ranks
    header = (soup_runs["two"] / "stages" / "02_instant_soup" / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"learner_ranks", "learner_s"} <= set(header)


def test_soup_ranks_agree_and_rank_0_alone_writes(soup_runs):
    e = entries(soup_runs["two"])["instant_soup"]
    assert e["status"] == "done" and e["ranks"]["world_size"] == 2 and e["ranks"]["identical"]
    assert e["ranks"]["masks_hash"] == e["metrics"]["final_masks_hash"]  # rank 0's final masks, the same on rank 1
    assert writes(soup_runs["log"], "soup_round") == {("0", "soup_round.safetensors"): 3}  # after each round, rank 0 only
    assert not (soup_runs["two"] / "stages" / "02_instant_soup" / "soup_round.safetensors").exists()
    assert {x[0] for x in soup_runs["log"] if x[1] == "wrote"} == {"0"}  # checkpoints of the stages too
    assert soup_runs["proc"].stdout.count("run: ") == 1
    assert e["metrics"]["eval_images"] == 101  # the sharded evaluation counts each image once


def test_soup_learners_match_one_process_while_the_weights_entering_match(soup_runs):
    one = entries(soup_runs["one"])["instant_soup"]["metrics"]
    two = entries(soup_runs["two"])["instant_soup"]["metrics"]
    # Round 1 starts from the same weights on both sides and a learner is seeded from (stage seed,
    # round, learner) alone, trained alone on its rank: the same masks and accuracies, whichever rank.
    for k in ("combined_masks_hash", "learner_top1", "learner_sparsity", "sparsity", "combined_top1"):
        assert two["rounds"][0][k] == one["rounds"][0][k], k
    # The main model then trains under DDP: the same global batches (each rank its half of the
    # one-process batch), but the gradient is summed in another order, and AdamW's normalized
    # first steps amplify those last-bit differences into weights that differ slightly (as the
    # finetune stage's do); later rounds start from them, so their masks may differ. The plan does not.
    assert two["images_seen"] == one["images_seen"] and two["schedule"] == one["schedule"]
    assert two["n_rounds"] == one["n_rounds"] and two["scope_sparsity"] == pytest.approx(one["scope_sparsity"], abs=1e-3)


@pytest.mark.slow
def test_soup_without_main_training_equals_one_process(tmp_path):
    """With no main-model steps in the rounds every round starts from the one-process weights: every mask matches."""
    recipe = recipe_file(tmp_path, SOUP_DATA, [{"kind": "magnitude_prune", "sparsity": 0.2}, {**SOUP, "main_epochs": 0}])
    p, _ = torchrun2(tmp_path, recipe, tmp_path / "run2")
    assert p.returncode == 0, p.stderr[-3000:]
    one = entries(one_process(recipe, tmp_path / "run1"))["instant_soup"]["metrics"]
    two = entries(tmp_path / "run2")["instant_soup"]["metrics"]
    assert [r["combined_masks_hash"] for r in two["rounds"]] == [r["combined_masks_hash"] for r in one["rounds"]]
    assert two["final_masks_hash"] == one["final_masks_hash"]  # the fine-tune (under DDP) changes weights, not masks


@pytest.mark.slow
def test_soup_resumed_on_two_ranks_equals_the_uninterrupted_run(soup_runs):
    tmp, recipe = soup_runs["tmp"], soup_runs["recipe"]
    run = tmp / "resumed"
    p, _ = torchrun2(tmp, recipe, run, LOTUS_TEST_CRASH_ROUND="1")
    assert p.returncode != 0 and "simulated crash in round 2" in p.stderr
    p, log = torchrun2(tmp, recipe, run, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    ref = entries(soup_runs["two"])["instant_soup"]["metrics"]
    e = entries(run)["instant_soup"]
    m = e["metrics"]
    assert m["resumed_after_round"] == 1 and e["ranks"]["identical"]  # rank 0 read the checkpoint, rank 1 received it
    assert sorted((int(x[2]), int(x[3])) for x in log if x[1] == "learner") == [(rnd, j) for rnd in (1, 2) for j in range(3)]
    assert [r["combined_masks_hash"] for r in m["rounds"]] == [r["combined_masks_hash"] for r in ref["rounds"]]
    assert m["final_masks_hash"] == ref["final_masks_hash"] and m["images_seen"] == ref["images_seen"]


# ---- lottery_finetune -------------------------------------------------------------------------------

LOTTERY_DATA = {"batch_size": 16, "train_subset": 48, "eval_subset": 33}  # 3 scoring batches of train, 3 of eval (16, 16, 1)
LOTTERY = {"kind": "lottery_finetune", "lr": 2e-3, "eval_tokens": "ticket", "show": 0}
LOTTERY_STAGES = [
    {"kind": "magnitude_prune", "sparsity": 0.3},
    {**LOTTERY, "name": "att", "epochs": 2, "keep": 0.5},  # teacher: the pruned initial model entering
    {**LOTTERY, "name": "hier", "steps": 2, "drop_at": [1], "keep": 0.7, "teacher": "initial"},
    {**LOTTERY, "name": "online", "steps": 2, "keep": 0.5, "scoring": "online", "teacher": "initial"},
]


@pytest.fixture(scope="module")
def lottery_runs(tmp_path_factory):
    """Cached input-level and hierarchical tickets and online scoring, on 2 ranks and in one process."""
    tmp = tmp_path_factory.mktemp("lottery")
    recipe = recipe_file(tmp, LOTTERY_DATA, LOTTERY_STAGES)
    p, log = torchrun2(tmp, recipe, tmp / "run2")
    assert p.returncode == 0, p.stderr[-3000:]
    return {"two": tmp / "run2", "one": one_process(recipe, tmp / "run1"), "log": log, "tmp": tmp, "recipe": recipe}


def read_cache(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_ticket_cache_is_written_once_and_equals_one_process(lottery_runs):
    import torch

    files = sorted(p.name for p in (lottery_runs["two"] / "tickets").iterdir())
    assert len(files) == 5  # att: train + eval, hier: train + eval, online: eval
    assert writes(lottery_runs["log"], "scores-") == {("0", f): 1 for f in files}
    assert files == sorted(p.name for p in (lottery_runs["one"] / "tickets").iterdir())  # same keys: same teacher, data
    for name in files:
        (meta2, t2), (meta1, t1) = read_cache(lottery_runs["two"] / "tickets" / name), read_cache(lottery_runs["one"] / "tickets" / name)
        assert meta2 == meta1 and t2.keys() == t1.keys(), name
        assert all(torch.equal(t2[k], t1[k]) for k in t1), name  # each batch is the one a single process scores


def test_ticket_scoring_is_spread_over_the_ranks(lottery_runs):
    scored = Counter()
    for r, *w in lottery_runs["log"]:
        if w[0] == "scored":
            scored[r] += int(w[1])
    # batches of 16, rank r scoring batches r, r + 2, ...: train 48 = (16 + 16 | 16), eval 33 = (16 + 1 | 16);
    # att and hier score both splits, online the eval split (its teacher's passes in training go through
    # cls_attention, not score_images)
    assert scored == {"0": 2 * (32 + 17) + 17, "1": 2 * (16 + 16) + 16}


def test_ticket_eval_counts_every_image_once(lottery_runs):
    two, one = entries(lottery_runs["two"]), entries(lottery_runs["one"])
    for name in ("att", "hier", "online"):
        e = two[name]
        assert e["status"] == "done" and e["ranks"]["world_size"] == 2 and e["ranks"]["identical"], name
        assert e["metrics"]["ticket_eval_images"] == one[name]["metrics"]["ticket_eval_images"] == 33, name  # 17 + 16
        assert e["metrics"]["scores_source"] == ("online" if name == "online" else "computed"), name
    # the tables are equal, so are the tickets chosen from them (compared with a seeded random control)
    assert two["att"]["metrics"]["random_shared"] == one["att"]["metrics"]["random_shared"]
    assert two["att"]["metrics"]["sink_shared"] == one["att"]["metrics"]["sink_shared"]


@pytest.mark.slow
def test_ticket_cache_read_by_rank_0_serves_every_rank(lottery_runs):
    import shutil

    tmp = lottery_runs["tmp"]
    run = tmp / "rerun"
    shutil.copytree(lottery_runs["two"], run)
    p, log = torchrun2(tmp, lottery_runs["recipe"], run, "--rerun-from", "att")
    assert p.returncode == 0, p.stderr[-3000:]
    e = entries(run)
    assert [e[n]["metrics"]["scores_source"] for n in ("att", "hier", "online")] == ["cache", "cache", "online"]
    assert not writes(log, "scores-") and not [x for x in log if x[1] == "scored"]  # no rank scored: rank 0's file served both
    assert all(e[n]["ranks"]["identical"] for n in ("att", "hier", "online"))
    assert e["att"]["metrics"]["random_shared"] == entries(lottery_runs["two"])["att"]["metrics"]["random_shared"]
