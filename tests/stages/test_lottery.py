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


# ----------------------------------------------------------------------------- hierarchical dropping (Data-LTH / EViT)

HIER = {"drop_at": [1, 2, 3], "keep": 0.7}  # tiny model (4 blocks, 16 patches): K = 12, 9, 7
HIER_TOKENS = [17, 13, 10, 8]  # tokens entering blocks 0..3: CLS + 16, 12, 9, 7


def _tiny_recipe(stages, augment="none", model_kwargs=None):
    r = copy.deepcopy(TINY_RECIPE)
    r["model"] = {"name": "lotus_vit_tiny_patch8_32", "num_classes": 10, "kwargs": dict(model_kwargs or {})}
    r["data"].update({"batch_size": 16, "train_subset": 48, "eval_subset": 32, "augment": augment})
    r["stages"] = stages
    return parse_recipe(r)


@pytest.mark.parametrize(
    "fields,keeps",
    [({"drop_at": [3, 6, 9]}, [0.7] * 3), ({"drop_at": [3, 6, 9], "keep": 0.5}, [0.5] * 3),
     ({"drop_at": [2, 4], "keep": [0.9, 0.6]}, [0.9, 0.6]), ({"drop_at": [1], "drop": 0.25}, [0.75])],
    ids=["default-0.7-each", "one-ratio-each", "ratio-per-location", "drop"],
)
def test_hierarchical_config(fields, keeps):
    cfg = _recipe([{"kind": "lottery_finetune", **fields}]).stages[0]
    assert cfg.location_keeps == pytest.approx(keeps)
    with pytest.raises(ValueError, match="location_keeps"):
        _ = cfg.keep_ratio


@pytest.mark.parametrize(
    "fields",
    [{"drop_at": [0, 3]}, {"drop_at": [6, 3]}, {"drop_at": [3, 3]}, {"drop_at": []}, {"drop_at": [3, 6], "keep": [0.7]},
     {"keep": [0.7, 0.7]}, {"drop_at": [3], "blocks": "mean"}, {"drop_at": [3], "selection": "full"},
     {"drop_at": [3], "keep": [1.2]}, {"drop_at": [3], "nope": 1}, {"teacher": "self"}, {"teacher_run": "runs/x"},
     {"teacher": "self", "scoring": "online", "teacher_run": "runs/x"}],
    ids=["block-0", "descending", "repeated", "empty", "ratio-count", "list-without-drop-at", "blocks-with-drop-at",
         "full-with-drop-at", "ratio-above-1", "unknown-field", "self-cached", "run-without-teacher", "run-with-self"],
)
def test_bad_hierarchical_config_is_a_recipe_error(fields):
    with pytest.raises(RecipeError):
        _recipe([{"kind": "lottery_finetune", **fields}])


class _PlanRecorder:
    """Wraps tickets.forward_tokens_dropping: per call, train/eval, tokens entering each block, the images and tickets."""

    def __init__(self):
        self.calls = []
        self.orig = T.forward_tokens_dropping

    def __call__(self, model, x, plan, tickets=None, **kw):
        seen = []
        hs = [b.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1])) for b in model.blocks]
        try:
            out = self.orig(model, x, plan, tickets, **kw)
        finally:
            for h in hs:
                h.remove()
        self.calls.append({"training": model.training, "tokens": seen, "x": x.detach().clone(), "model": model,
                           "tickets": None if tickets is None else [t.detach().clone() for t in tickets],
                           "selection": kw.get("selection", "attention")})
        return out


HIER_ARMS = {
    "cached": ({"scoring": "cached", "teacher": "train", "epochs": 2}, "none"),
    "online": ({"scoring": "online", "teacher": "train", "steps": 3}, "crop_flip"),
    "self": ({"scoring": "online", "teacher": "self", "steps": 3}, "crop_flip"),
    "random": ({"scoring": "online", "selection": "random", "epochs": 2}, "crop_flip"),
}


@pytest.fixture(scope="module")
def hier_runs(tmp_path_factory):
    """finetune `train` -> hierarchical lottery_finetune (eval on tickets), one run per arm, forward calls recorded."""
    out = {}
    for arm, (fields, augment) in HIER_ARMS.items():
        rec = _PlanRecorder()
        stages = [
            {"kind": "finetune", "name": "train", "steps": 4, "lr": 2e-3},
            {"kind": "lottery_finetune", "name": "lottery", "lr": 2e-3, "eval_tokens": "ticket", "show": 4, **HIER, **fields},
        ]
        torch.manual_seed(0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "forward_tokens_dropping", rec)
            run_dir = compress(_tiny_recipe(stages, augment), out=tmp_path_factory.mktemp("hier") / arm, quiet=True)
        out[arm] = (run_dir, rec.calls)
    return out


@pytest.mark.parametrize("arm", list(HIER_ARMS))
def test_hierarchical_stage_runs_end_to_end_on_k_tokens_per_location(hier_runs, arm):
    run_dir, calls = hier_runs[arm]
    e = _entry(run_dir, "lottery")
    m = e["metrics"]
    assert e["status"] == "done"
    assert (m["drop_at"], m["kept_per_location"], m["tokens_per_block"]) == ([1, 2, 3], [12, 9, 7], HIER_TOKENS)
    assert m["blocks"] == [0, 1, 2] and m["kept_patches"] == 7
    assert m["token_fraction"] == pytest.approx(sum(HIER_TOKENS) / (4 * 17))
    train_calls = [c for c in calls if c["training"]]
    eval_calls = [c for c in calls if not c["training"]]
    assert train_calls and eval_calls
    assert all(c["tokens"] == HIER_TOKENS for c in calls)  # training and ticket evaluation alike
    assert all("eval_top1" in h and "eval_ticket_top1" in h for h in m["history"])
    assert m["ticket_top1"] == m["history"][-1]["eval_ticket_top1"] and 0 <= m["top1"] <= 100
    assert (run_dir / e["artifacts"]["tickets_png"]["path"]).read_bytes()[:8] == PNG
    assert m["augment"] == HIER_ARMS[arm][1]


def test_hierarchical_cached_tickets_are_stored_nested(hier_runs):
    run_dir, calls = hier_runs["cached"]
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["scores_source"] == "computed" and m["teacher"] == "train"
    tables = load_tensors(run_dir / m["scores_file"])
    assert {k: tuple(v.shape) for k, v in tables.items()} == {"at1": (48, 12), "at2": (48, 9), "at3": (48, 7)}
    assert all(bool(torch.isin(tables["at3"][i], tables["at2"][i]).all() and torch.isin(tables["at2"][i], tables["at1"][i]).all()) for i in range(48))
    assert all(c["tickets"] is not None for c in calls)  # the student runs on the teacher's tickets, never its own


def test_hierarchical_ticket_eval_equals_the_teachers_tickets_recomputed(hier_runs):
    from lotus_deploy.data import build_data
    from lotus_deploy.models import input_spec
    from lotus_deploy.run import Run
    from lotus_deploy.train import evaluate

    run_dir, _ = hier_runs["cached"]
    run = Run(run_dir)
    teacher, _ = run.load("train")
    student, _ = run.load("lottery")
    plan = T.drop_plan(teacher, [1, 2, 3], [0.7] * 3)
    data = build_data(run.recipe.data, input_spec(student))
    ev = data.eval_dataset()
    x = torch.stack([ev[i][0] for i in range(len(ev))])
    y = torch.tensor([int(ev[i][1]) for i in range(len(ev))])
    tickets = T.hierarchical_tickets(teacher, x, plan)
    loader = [(x, y, torch.cat(tickets, 1))]
    r = evaluate(student, loader, torch.device("cpu"), forward=lambda x_, idx: T.forward_tokens_dropping(student, x_, plan, plan.split(idx)))
    assert _entry(run_dir, "lottery")["metrics"]["ticket_top1"] == pytest.approx(r["top1"])


def test_hierarchical_online_teacher_scores_each_augmented_batch(hier_runs):
    from lotus_deploy.run import Run

    run_dir, calls = hier_runs["online"]
    teacher, _ = Run(run_dir).load("train")
    plan = T.drop_plan(teacher, [1, 2, 3], [0.7] * 3)
    train_calls = [c for c in calls if c["training"]]
    assert len(train_calls) == 3
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["teacher_seconds"] > 0 and m["history"][-1]["teacher_seconds"] == m["teacher_seconds"]  # one epoch of 3 steps
    for c in train_calls:  # the frozen `train` variant chose these tickets on this (augmented) batch
        want = T.hierarchical_tickets(teacher, c["x"], plan)
        assert all(torch.equal(g, w) for g, w in zip(c["tickets"], want))


def test_hierarchical_self_teacher_chooses_inside_its_own_forward(hier_runs):
    run_dir, calls = hier_runs["self"]
    m = _entry(run_dir, "lottery")["metrics"]
    assert (m["teacher"], m["teacher_seconds"]) == ("self", 0.0)  # no pass outside the student's own forward
    assert all(c["tickets"] is None and c["selection"] == "attention" for c in calls)  # training and ticket eval
    assert not (run_dir / "tickets").exists()  # nothing scored ahead


def test_hierarchical_random_arm_evaluates_on_fixed_random_tickets(hier_runs):
    run_dir, calls = hier_runs["random"]
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["scores_source"] == "online" and len(m["history"]) == 2
    train_calls = [c for c in calls if c["training"]]
    assert all(c["tickets"] is None and c["selection"] == "random" for c in train_calls)
    evals = [c for c in calls if not c["training"]]
    assert len(evals) == 2 * 2  # 32 eval images in batches of 16, two epochs
    first, second = evals[:2], evals[2:]
    assert all(torch.equal(a, b) for ca, cb in zip(first, second) for a, b in zip(ca["tickets"], cb["tickets"]))
    teacher_like = T.hierarchical_tickets(first[0]["model"], first[0]["x"], T.drop_plan(first[0]["model"], [1, 2, 3], [0.7] * 3))
    assert not all(torch.equal(a, b) for a, b in zip(first[0]["tickets"], teacher_like))  # random, not attention


def test_input_level_random_and_attention_arms_evaluate_on_tickets(tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(T, "forward_tokens", rec)
    stages = [
        {"kind": "lottery_finetune", "name": "att", "steps": 2, "keep": 0.5, "eval_tokens": "ticket", "show": 0},
        {"kind": "lottery_finetune", "name": "rand", "steps": 2, "keep": 0.5, "selection": "random", "eval_tokens": "ticket", "show": 0},
        {"kind": "lottery_finetune", "name": "self", "steps": 2, "keep": 0.5, "teacher": "self", "scoring": "online", "eval_tokens": "ticket", "show": 0},
    ]
    run_dir = compress(_recipe(stages), out=tmp_path / "r", quiet=True)
    for name in ("att", "rand", "self"):
        m = _entry(run_dir, name)["metrics"]
        assert 0 <= m["ticket_top1"] <= 100 and "eval_ticket_top1" in m["history"][-1], name
    assert _entry(run_dir, "self")["metrics"]["teacher"] == "self"
    assert rec.shapes == [(16, 8)] * 3 * (2 + 2)  # per stage: 2 training steps, then 2 ticket-eval batches of 16 of the 32 images


def test_hierarchical_show_run_tickets(hier_runs, tmp_path):
    from lotus_deploy.stages.lottery import show_run_tickets

    run_dir, _ = hier_runs["cached"]
    assert show_run_tickets(run_dir, 3, tmp_path / "t.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- a teacher from another run


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    torch.manual_seed(1)
    stages = [{"kind": "finetune", "name": "train", "steps": 3, "lr": 2e-3}, {"kind": "magnitude_prune", "sparsity": 0.5}]
    return compress(_tiny_recipe(stages), out=tmp_path_factory.mktemp("teacher") / "dense", quiet=True)


def test_teacher_run_dense_variant_scores(teacher_run, tmp_path, monkeypatch):
    from lotus_deploy.run import Run

    used = []
    orig = T.hierarchical_dataset
    monkeypatch.setattr(T, "hierarchical_dataset", lambda model, *a, **k: used.append(model) or orig(model, *a, **k))
    stages = [{"kind": "lottery_finetune", "name": "lottery", "steps": 2, "teacher": "dense", "teacher_run": str(teacher_run), "show": 0, **HIER}]
    torch.manual_seed(2)
    run_dir = compress(_tiny_recipe(stages), out=tmp_path / "student", quiet=True)
    m = _entry(run_dir, "lottery")["metrics"]
    assert m["teacher"] == f"{teacher_run}:dense"
    dense, _ = Run(teacher_run).load("dense")
    (teacher,) = used
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in teacher.state_dict().items())  # the other run's dense scored
    student_initial = load_tensors(run_dir / "initial" / "model.safetensors")
    assert not torch.equal(student_initial["blocks.0.attn.qkv.weight"], dense.state_dict()["blocks.0.attn.qkv.weight"])


def test_teacher_run_with_another_patch_grid_is_a_run_error(teacher_run, tmp_path):
    stages = [{"kind": "lottery_finetune", "steps": 1, "teacher": "dense", "teacher_run": str(teacher_run), "show": 0, **HIER}]
    with pytest.raises(RunError, match="patch grid"):
        compress(_tiny_recipe(stages, model_kwargs={"patch_size": 4}), out=tmp_path / "s", quiet=True)


def test_hierarchical_online_and_cached_tickets_agree_on_unaugmented_images(tmp_path):
    """The same teacher picks the same nested tickets for each training image, scored once (cached) or per batch (online)."""
    per_image = {}
    for scoring in ("cached", "online"):
        rec = _PlanRecorder()
        stages = [
            {"kind": "finetune", "name": "train", "steps": 4, "lr": 2e-3},
            {"kind": "lottery_finetune", "name": "lottery", "steps": 3, "lr": 2e-3, "teacher": "train", "scoring": scoring, "show": 0, **HIER},
        ]
        torch.manual_seed(0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "forward_tokens_dropping", rec)
            compress(_tiny_recipe(stages, "none"), out=tmp_path / scoring, quiet=True)
        seen = {}
        for c in (c for c in rec.calls if c["training"]):
            for n in range(c["x"].shape[0]):
                seen[c["x"][n].numpy().tobytes()] = [t[n].tolist() for t in c["tickets"]]
        per_image[scoring] = seen
    cached, online = per_image["cached"], per_image["online"]
    assert len(cached) == len(online) == 48  # 3 steps of 16 images: each image once
    assert cached == online
