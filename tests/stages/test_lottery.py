"""The ``lottery_finetune`` stage and ``lotus tickets`` on the micro model and digits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_RECIPE

from lotus_deploy.errors import RunError
from lotus_deploy.files import load_tensors, read_json
from lotus_deploy.pipeline import compress
from lotus_deploy.prune import tickets as T
from lotus_deploy.recipe import RecipeError, parse_recipe

PNG = b"\x89PNG\r\n\x1a\n"


def _recipe(stages, augment="none", **data):
    r = copy.deepcopy(TINY_RECIPE)
    r["data"].update({"batch_size": 16, "train_subset": 48, "eval_subset": 32, "augment": augment, **data})
    r["stages"] = stages
    return parse_recipe(r)


def _entry(run_dir, name):
    return next(e for e in read_json(run_dir / "manifest.json")["stages"] if e["name"] == name)


K_CALLS: list[tuple[int, float]] = []  # num_kept calls during the pruned_run fixture's stage


class _Recorder:
    """Wraps tickets.forward_tokens to record the kept-index shape of every call."""

    def __init__(self):
        self.shapes = []
        self.orig = T.forward_tokens

    def __call__(self, model, x, idx=None):
        self.shapes.append(None if idx is None else tuple(idx.shape))
        return self.orig(model, x, idx)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields,keep", [({}, 0.9), ({"keep": 0.7}, 0.7), ({"drop": 0.1}, 0.9), ({"selection": "full", "keep": 0.5}, 1.0)],
    ids=["default-drop-10pct", "keep", "drop", "full-keeps-all"],
)
def test_keep_ratio(fields, keep):
    cfg = _recipe([{"kind": "lottery_finetune", **fields}]).stages[0]
    assert cfg.keep_ratio == pytest.approx(keep) and cfg.epochs == 1.0


@pytest.mark.parametrize(
    "fields",
    [{"keep": 0.5, "drop": 0.5}, {"keep": 0.0}, {"keep": 1.5}, {"drop": 1.0}, {"selection": "best"}, {"sink": "keep"}, {"blocks": "first"}],
    ids=["keep-and-drop", "keep-0", "keep-above-1", "drop-1", "bad-selection", "bad-sink", "bad-blocks"],
)
def test_bad_config_is_a_recipe_error(fields):
    with pytest.raises(RecipeError):
        _recipe([{"kind": "lottery_finetune", **fields}])


# ----------------------------------------------------------------------------- one run after pruning


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """finetune -> 50% magnitude prune -> lottery_finetune (keep 0.5, eval on tickets), crop_flip data."""
    rec = _Recorder()
    recipe = _recipe(
        [
            {"kind": "finetune", "name": "train", "steps": 6, "lr": 2e-3},
            {"kind": "magnitude_prune", "sparsity": 0.5},
            {"kind": "lottery_finetune", "name": "lottery", "epochs": 2, "keep": 0.5, "lr": 2e-3, "eval_tokens": "ticket", "show": 6},
        ],
        augment="crop_flip",
    )
    out = tmp_path_factory.mktemp("runs") / "pruned"
    num_kept = T.num_kept
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "forward_tokens", rec)
        mp.setattr(T, "num_kept", lambda p, keep: K_CALLS.append((p, keep)) or num_kept(p, keep))
        compress(recipe, out=out, quiet=True)
    return out, rec.shapes


def test_training_runs_on_k_patch_tokens(pruned_run):
    run_dir, shapes = pruned_run
    m = _entry(run_dir, "lottery")["metrics"]
    assert (m["kept_patches"], m["patches"], m["prefix_tokens"]) == (8, 16, 1)
    assert m["token_fraction"] == pytest.approx(9 / 17)
    # 2 epochs of 48 images in batches of 16 (train) + 2 ticket evals of 32 images in batches of 16
    assert len(shapes) == 6 + 4 and all(s is not None and s[1] == 8 for s in shapes)


def test_k_is_resolved_once_per_stage(pruned_run):
    assert K_CALLS == [(16, 0.5)]  # every ticket table, ticket eval and figure reuse that K


def test_masks_stay_enforced_and_weights_change(pruned_run):
    run_dir, _ = pruned_run
    stage = run_dir / "stages" / "03_lottery"
    w, masks = load_tensors(stage / "model.safetensors"), load_tensors(stage / "masks.safetensors")
    before = load_tensors(run_dir / "stages" / "02_magnitude_prune" / "model.safetensors")
    assert masks and all(bool((w[k][~mk] == 0).all()) for k, mk in masks.items())
    assert sum(int((~mk).sum()) for mk in masks.values()) > 0
    assert any(not torch.equal(w[k], before[k]) for k in masks)  # it trained


def test_both_evaluations_are_reported_per_epoch(pruned_run):
    run_dir, _ = pruned_run
    m = _entry(run_dir, "lottery")["metrics"]
    for key in ("top1", "top5", "eval_loss", "ticket_top1", "ticket_top5", "ticket_eval_loss"):
        assert 0 <= m[key] <= (100 if "top" in key else 50), key
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert all("eval_top1" in h and "eval_ticket_top1" in h for h in m["history"])
    assert m["history"][-1]["eval_top1"] == m["top1"] and m["history"][-1]["eval_ticket_top1"] == m["ticket_top1"]
    csv = (run_dir / "stages" / "03_lottery" / "history.csv").read_text().splitlines()
    assert "eval_ticket_top1" in csv[0] and len(csv) == 3


def test_augmentation_disabled_with_a_stated_reason(pruned_run):
    run_dir, _ = pruned_run
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["augment"] == "none" and "misalign" in m["augment_note"]
    assert "misalign" in (run_dir / "run.log").read_text()


def test_scores_cached_in_the_run_with_sink_comparison(pruned_run):
    run_dir, _ = pruned_run
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["scores_source"] == "computed" and (run_dir / m["scores_file"]).is_file()
    s = load_tensors(run_dir / m["scores_file"])
    assert s["normalize"].shape == s["exclude"].shape == (48, 16)
    assert 0 < m["sink_shared"] <= 1 and 0 <= m["sink_images_changed"] <= 1
    assert m["random_shared"] < 1


def test_pngs_written(pruned_run):
    run_dir, _ = pruned_run
    e = _entry(run_dir, "lottery")
    for name in ("tickets_png", "curves_png"):
        assert (run_dir / e["artifacts"][name]["path"]).read_bytes()[:8] == PNG


def test_lotus_tickets_cli(pruned_run, tmp_path):
    from click.testing import CliRunner

    from lotus_deploy.cli import main

    run_dir, _ = pruned_run
    res = CliRunner().invoke(main, ["tickets", str(run_dir), "--show", "3", "--out", str(tmp_path / "t.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    res = CliRunner().invoke(main, ["tickets", str(run_dir), "--stage", "train"])
    assert res.exit_code == 2 and "no lottery_finetune stage named 'train'" in res.output


# ----------------------------------------------------------------------------- determinism and resume


def test_scores_deterministic_and_reused_on_resume(tmp_path, monkeypatch):
    from lotus_deploy.stages import lottery

    stages = [
        {"kind": "finetune", "name": "train", "steps": 3, "lr": 2e-3},
        {"kind": "lottery_finetune", "name": "lottery", "steps": 2, "keep": 0.5, "show": 0},
    ]
    real = lottery.run_training

    def crash(*a, **k):
        raise KeyboardInterrupt("stopped after scoring")

    monkeypatch.setattr(lottery, "run_training", crash)
    torch.manual_seed(0)  # the runner builds from-scratch weights from the global RNG
    with pytest.raises(KeyboardInterrupt):
        compress(_recipe(stages), out=tmp_path / "a", quiet=True)
    assert _entry(tmp_path / "a", "lottery")["status"] == "failed"
    files = list((tmp_path / "a" / "tickets").glob("scores-train-*.safetensors"))
    assert len(files) == 1
    first = files[0].read_bytes()

    monkeypatch.setattr(lottery, "run_training", real)
    compress(_recipe(stages), out=tmp_path / "a", resume=True, quiet=True)
    m = _entry(tmp_path / "a", "lottery")["metrics"]
    assert m["scores_source"] == "cache" and (tmp_path / "a" / m["scores_file"]) == files[0]
    assert files[0].read_bytes() == first

    torch.manual_seed(0)
    compress(_recipe(stages), out=tmp_path / "b", quiet=True)  # same seeds, fresh directory
    m2 = _entry(tmp_path / "b", "lottery")["metrics"]
    assert m2["scores_source"] == "computed" and m2["scores_file"] == m["scores_file"]
    a, b = load_tensors(files[0]), load_tensors(tmp_path / "b" / m2["scores_file"])
    assert torch.equal(a["normalize"], b["normalize"]) and torch.equal(a["exclude"], b["exclude"])


# ----------------------------------------------------------------------------- controls, online, teacher


def test_random_and_full_controls_share_the_code_path(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(T, "forward_tokens", rec)
    stages = [
        {"kind": "lottery_finetune", "name": "rand", "epochs": 2, "keep": 0.75, "selection": "random", "show": 4,
         "early_bird": {"sparsity": 0.5, "window": 2, "threshold": 1.0}},
        {"kind": "lottery_finetune", "name": "full", "steps": 2, "selection": "full", "show": 0},
    ]
    run_dir = compress(_recipe(stages), out=tmp_path / "r", quiet=True)
    r, f = _entry(run_dir, "rand")["metrics"], _entry(run_dir, "full")["metrics"]
    assert (r["kept_patches"], r["scores_source"]) == (12, "none") and "scores_file" not in r
    assert (f["kept_patches"], f["token_fraction"]) == (16, 1.0)
    assert r["early_bird"]["sparsity"] == 0.5  # Finetune's early_bird works here too
    assert rec.shapes == [(16, 12)] * 6 + [(16, 16)] * 2
    assert not (run_dir / "tickets").exists()  # no teacher pass for the controls


def test_online_scoring_keeps_augmentation_and_named_teacher(tmp_path, monkeypatch):
    from lotus_deploy.stages import lottery

    teachers = []
    orig = lottery.OnlineForward.__init__

    def spy(self, cfg, model, teacher, *a):
        teachers.append((model, teacher))
        orig(self, cfg, model, teacher, *a)

    monkeypatch.setattr(lottery.OnlineForward, "__init__", spy)
    stages = [
        {"kind": "finetune", "name": "train", "steps": 3, "lr": 2e-3},
        {"kind": "lottery_finetune", "name": "online", "steps": 3, "keep": 0.5, "scoring": "online", "teacher": "initial", "show": 2},
    ]
    run_dir = compress(_recipe(stages, augment="crop_flip"), out=tmp_path / "o", quiet=True)
    m = _entry(run_dir, "online")["metrics"]
    assert (m["augment"], m["scores_source"], m["teacher"]) == ("crop_flip", "online", "initial")
    ((student, teacher),) = teachers
    assert teacher is not student and not teacher.training
    initial = load_tensors(run_dir / "initial" / "model.safetensors")
    assert all(torch.equal(v, initial[k]) for k, v in teacher.state_dict().items())  # scored by `initial`


def test_online_forward_picks_teacher_tickets():
    from lotus_deploy.models import build_model
    from lotus_deploy.recipe.base import ModelConfig
    from lotus_deploy.stages.lottery import OnlineForward

    cfg = _recipe([{"kind": "lottery_finetune", "keep": 0.5, "scoring": "online"}]).stages[0]
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="lotus_vit_micro_patch8_32", num_classes=10)).eval()
    x = torch.randn(3, 3, 32, 32)
    fwd = OnlineForward(cfg, m, m, [1], 16, T.num_kept(16, cfg.keep_ratio), seed=0)
    want = T.top_k(T.score_images(m, x, [1])["normalize"], 8)
    assert torch.equal(fwd.idx(x), want)
    torch.testing.assert_close(fwd(x), T.forward_tokens(m, x, want))


def test_unknown_teacher_is_a_run_error(tmp_path):
    stages = [{"kind": "lottery_finetune", "steps": 1, "teacher": "nope"}]
    with pytest.raises(RunError, match="teacher 'nope'"):
        compress(_recipe(stages), out=tmp_path / "t", quiet=True)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["stages"][0]["status"] == "failed"
