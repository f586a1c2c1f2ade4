import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchshrink as ts
from torchshrink.core.data import Batch
from torchshrink.core.errors import ConfigError, DataError, LayerNotFoundError
from torchshrink.distill import Distiller, FeaturePair
from torchshrink.measure.quality import accuracy
from torchshrink.recipe import Finetune, Task, recipe_from_yaml, run_stage
from torchshrink.recipe.train import recovery_loss
from torchshrink.zoo.digits import digits_loaders


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def loaders():
    """(train batches of 128, val batches, test batches) as lists: no DataLoader overhead."""
    train, val, test = digits_loaders(batch_size=128, seed=0)
    return list(train), list(val), list(test)


@pytest.fixture(scope="module")
def teacher(loaders):
    torch.manual_seed(0)
    net = mlp(128)
    x = torch.cat([b[0] for b in loaders[0]])
    y = torch.cat([b[1] for b in loaders[0]])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):  # full-batch
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_distilled_student_learns_and_teacher_is_untouched(teacher, loaders):
    train, _, test = loaders
    before = _snapshot(teacher)
    torch.manual_seed(1)
    student = mlp(16)
    d = Distiller(teacher, student, temperature=4.0, alpha=0.7)
    hist = d.fit(train, Finetune(epochs=8, lr=2e-2))
    assert len(hist) == 8 and hist[-1]["loss"] < hist[0]["loss"]
    assert accuracy(student, test) > 0.85
    assert accuracy(teacher, test) > 0.9
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training


def test_unknown_feature_tap_fails_before_training_with_close_names(teacher):
    with pytest.raises(LayerNotFoundError, match=r"feature tap on the teacher: no layer named '4'.*teacher modules: 0, 1, 2, 3"):
        Distiller(teacher, mlp(16), features=["1=4"])
    with pytest.raises(LayerNotFoundError, match="student: no layer named '9'"):
        Distiller(teacher, mlp(16), features=[("9", "1")])
    with pytest.raises(ConfigError, match="student_module=teacher_module"):
        Distiller(teacher, mlp(16), features=["1"])


def test_output_shapes_that_cannot_be_matched_fail_before_any_step(teacher, loaders):
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    before = _snapshot(student)
    with pytest.raises(DataError, match=r"student output \(128, 5\) cannot be matched to the teacher output \(128, 10\)"):
        Distiller(teacher, student).fit(loaders[0], Finetune(epochs=1))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize(("kw", "match"), [({"temperature": 0.0}, "temperature"), ({"alpha": 1.2}, "alpha"),
                                           ({"output_loss": "l1"}, "output_loss"),
                                           ({"output_loss": "none"}, "at least one feature")])
def test_bad_settings_are_config_errors(teacher, kw, match):
    with pytest.raises(ConfigError, match=match):
        Distiller(teacher, mlp(8), **kw)
    with pytest.raises(ConfigError, match="different module"):
        Distiller(teacher, teacher)


def test_hint_adapter_is_built_and_trained(teacher, loaders):
    torch.manual_seed(0)
    student = mlp(16)
    d = Distiller(teacher, student, features=[FeaturePair("2", "2", "hint", 0.5)])
    batches = list(loaders[0])[:4]
    d.fit(batches, Finetune(epochs=1, lr=1e-2))
    assert list(d.adapters) == ["0"]
    w0 = d.adapters["0"].proj.weight
    assert w0.shape == (128, 16)
    # the adapter is optimized: a fresh adapter with the same seed differs from the trained one
    torch.manual_seed(0)
    d2 = Distiller(teacher, mlp(16), features=[FeaturePair("2", "2", "hint", 0.5)])
    d2.check(next(iter(batches))[0:1])
    assert not torch.equal(d2.adapters["0"].proj.weight, w0)


def test_teacher_cache_skips_teacher_forwards_and_gives_the_same_loss(teacher, loaders):
    batches = list(loaders[1])[:2]  # fixed data
    calls = []
    h = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(0)
        s1 = mlp(16)
        s2 = copy.deepcopy(s1)
        cached = Distiller(teacher, s1, cache=True)
        plain = Distiller(teacher, s2)
        x, y = batches[0]
        assert torch.allclose(cached.loss(s1, (x,), y), plain.loss(s2, (x,), y))
        n0 = len(calls)
        cached.fit(batches, Finetune(epochs=3))
        # the check pass and the first epoch run the teacher; epochs 2 and 3 read the cache
        assert len(calls) - n0 <= 1 + len(batches)
        assert cached.cached_samples == sum(len(b[1]) for b in batches)
    finally:
        h.remove()


def test_recovery_distill_is_registered_and_uses_finetune_settings(teacher):
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    student = copy.deepcopy(teacher)
    loss = recovery_loss("distill", teacher, Finetune(temperature=2.0, alpha=1.0))
    assert float(loss(student, Batch((x,), y)).detach()) == pytest.approx(0.0, abs=1e-6)  # same model, soft term only
    loss_hard = recovery_loss("distill", teacher, Finetune(temperature=2.0, alpha=0.0))
    assert torch.allclose(loss_hard(student, Batch((x,), y)), F.cross_entropy(student(x), y))
    # unlabelled data (sentence encoders): output cosine + MSE
    student[3].weight.data.mul_(-1)
    student[3].bias.data.mul_(-1)
    assert float(loss(student, Batch((x,))).detach()) > 1.0


def test_distill_stage_in_a_recipe_builds_and_trains_the_student(teacher, loaders):
    train, val, test = loaders
    recipe = recipe_from_yaml(
        """
name: kd
stages:
  - kind: distill
    student: width
    width: 0.25
    finetune: {epochs: 6, lr: 0.02, temperature: 3.0, alpha: 0.8}
    recovery: distill
"""
    )
    task = Task(name="digits", inputs=(torch.rand(1, 1, 8, 8),), train=train,
                calibration=[x for x, _ in list(val)[:2]])
    student, hist = run_stage(teacher, recipe.stages[0], task)
    assert student[1].out_features == 32 and student[3].in_features == 32
    assert sum(p.numel() for p in student.parameters()) < 0.3 * sum(p.numel() for p in teacher.parameters())
    assert len(hist) == 6 and accuracy(student, test) > 0.85


def test_public_distill_verb_with_a_given_teacher(teacher, loaders):
    cfg = ts.config_from_dict({"kind": "distill", "epochs": 3, "lr": 2e-2})
    torch.manual_seed(0)
    student = mlp(32)
    out = ts.distill(student, cfg, teacher=teacher, train_data=loaders[0])
    assert out is not student and ts.report(out)[-1].notes["history"][-1]["loss"] > 0
    assert accuracy(out, loaders[2]) > accuracy(student, loaders[2])
    with pytest.raises(DataError, match="needs data"):
        ts.distill(mlp(32), cfg, teacher=teacher)
