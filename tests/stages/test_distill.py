"""Distillation (``distill:`` on finetune / lottery_finetune): the loss, alpha 0, the frozen teacher, tickets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RECIPE

from lotus_deploy.files import load_tensors, read_json
from lotus_deploy.pipeline import compress
from lotus_deploy.prune import tickets as T
from lotus_deploy.recipe import parse_recipe
from lotus_deploy.train import Distiller, TrainSpec, distill_loss, train

CPU = torch.device("cpu")


def _teacher():
    from lotus_deploy.models import build_model
    from lotus_deploy.recipe.base import ModelConfig

    torch.manual_seed(1)
    return build_model(ModelConfig(name="lotus_vit_micro_patch8_32", num_classes=10)).eval()


def _batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)  # (B, 3, 32, 32), (B,)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.9, 4.0), (1.0, 1.0)])
def test_loss_equals_the_formula_on_a_fixed_batch(micro_model, alpha, temperature):
    x, y = _batch()
    teacher = _teacher()
    with torch.no_grad():
        s, t = micro_model(x), teacher(x)  # (B, 10)
    ce = F.cross_entropy(s, y)
    p_t = torch.softmax(t / temperature, dim=1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temperature, dim=1))).sum(1).mean()
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    assert distill_loss(ce, s, t, alpha, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert Distiller(teacher, alpha, temperature)(ce, s, x).item() == pytest.approx(expected.item(), rel=1e-5)
    # the training loop minimizes exactly that: its one step's loss is the formula on the batch
    student = copy.deepcopy(micro_model)
    spec = TrainSpec(steps=1, lr=1e-3, warmup=0, label_smoothing=0.0)
    hist = train(student, spec, lambda epoch: [(x, y)], 1, CPU, distill=Distiller(teacher, alpha, temperature), log=lambda m: None)
    assert hist[0]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_zero_is_plain_training_bit_for_bit(micro_model):
    batches = [_batch(seed=i) for i in range(3)]
    spec = TrainSpec(steps=6, lr=1e-2, warmup=0.2, label_smoothing=0.1, grad_clip=1.0)
    plain, distilled = copy.deepcopy(micro_model), copy.deepcopy(micro_model)
    h0 = train(plain, spec, lambda epoch: batches, 3, CPU, log=lambda m: None)
    h1 = train(distilled, spec, lambda epoch: batches, 3, CPU, distill=Distiller(_teacher(), 0.0, 2.0), log=lambda m: None)
    assert [h["train_loss"] for h in h0] == [h["train_loss"] for h in h1]
    a, b = plain.state_dict(), distilled.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = copy.deepcopy(micro_model)
    train(other, spec, lambda epoch: batches, 3, CPU, distill=Distiller(_teacher(), 0.5, 2.0), log=lambda m: None)
    assert not all(torch.equal(a[k], v) for k, v in other.state_dict().items())  # the control: alpha > 0 changes training


# ----------------------------------------------------------------------------- the stages


def _recipe(stages, **data):
    r = copy.deepcopy(TINY_RECIPE)
    r["data"].update({"batch_size": 16, "train_subset": 48, "eval_subset": 32, **data})
    r["stages"] = stages
    return parse_recipe(r)


def _entry(run_dir, name):
    return next(e for e in read_json(run_dir / "manifest.json")["stages"] if e["name"] == name)


@pytest.fixture
def teachers(monkeypatch):
    """Every Distiller built during the test (its teacher kept for inspection)."""
    made = []
    init = Distiller.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(Distiller, "__init__", spy)
    return made


def test_finetune_distils_from_the_frozen_dense_model(tmp_path, teachers):
    stages = [
        {"kind": "finetune", "name": "train", "steps": 6, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.5},
        {"kind": "finetune", "name": "recover", "steps": 4, "lr": 5e-4, "distill": {"alpha": 0.7, "temperature": 3.0}},
    ]
    run = compress(_recipe(stages), out=tmp_path / "run", quiet=True)
    m = _entry(run, "recover")["metrics"]["distill"]
    dense = _entry(run, "train")
    assert m == {"teacher": "dense", "alpha": 0.7, "temperature": 3.0, "teacher_checkpoint": dense["artifacts"]["model"]["path"],
                 "teacher_top1": dense["metrics"]["top1"]}
    (d,) = teachers
    assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
    want = load_tensors(run / dense["artifacts"]["model"]["path"])
    got = d.teacher.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # unchanged by the stage
    distilled = load_tensors(run / "stages" / "03_recover" / "model.safetensors")

    # alpha 0 through the whole stage: the same weights as no distillation at all; alpha 0.7 differs
    def rerun(distill):
        stages[2] = {**stages[2], "distill": distill} if distill else {k: v for k, v in stages[2].items() if k != "distill"}
        compress(_recipe(stages), out=run, quiet=True, rerun_from="recover")
        return load_tensors(run / "stages" / "03_recover" / "model.safetensors")

    plain, zero = rerun(None), rerun({"alpha": 0.0})
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], distilled[k]) for k in plain)


def test_lottery_student_on_kept_tokens_teacher_on_full_image(tmp_path, teachers, monkeypatch):
    student, teacher = [], []
    forward_tokens = T.forward_tokens

    def spy_tokens(model, x, idx=None):
        h = model.blocks[0].register_forward_pre_hook(lambda mod, a: student.append((x, a[0].shape[1])))
        try:
            return forward_tokens(model, x, idx)
        finally:
            h.remove()

    call = Distiller.__call__

    def spy_call(self, label_loss, logits, x):
        h = self.teacher.blocks[0].register_forward_pre_hook(lambda mod, a: teacher.append((x, a[0].shape[1])))
        try:
            return call(self, label_loss, logits, x)
        finally:
            h.remove()

    monkeypatch.setattr(T, "forward_tokens", spy_tokens)
    monkeypatch.setattr(Distiller, "__call__", spy_call)
    stages = [
        {"kind": "finetune", "name": "train", "steps": 3, "lr": 2e-3},
        {"kind": "magnitude_prune", "sparsity": 0.5},
        {"kind": "lottery_finetune", "name": "lottery", "steps": 3, "keep": 0.5, "lr": 2e-3, "show": 0, "distill": {"teacher": "train"}},
    ]
    run = compress(_recipe(stages), out=tmp_path / "run", quiet=True)
    assert _entry(run, "lottery")["metrics"]["distill"]["teacher"] == "train"
    assert len(student) == len(teacher) == 3  # one per step
    for (xs, ns), (xt, nt) in zip(student, teacher):
        assert ns == 1 + 8 and nt == 1 + 16  # student: CLS + K = 8 kept patches; teacher: CLS + all 16
        assert xt.shape == (16, 3, 32, 32) and torch.equal(xs, xt)  # the same images, whole
