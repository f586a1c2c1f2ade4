import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import torchshrink as ts
from torchshrink.core.errors import ConfigError, DataError, LayerNotFoundError, UnsupportedLayerError
from torchshrink.prune import UnstructuredConfig, make_permanent
from torchshrink.prune import hold as hold_mod
from torchshrink.prune.importance import percentile_threshold
from torchshrink.prune.schedule import agp, iterative
from torchshrink.prune.unstructured import global_keep

torch.set_num_threads(2)


def sparsity(t: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(t)) / t.numel()


def test_layerwise_magnitude_exact_sparsity_and_percentile_rule(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    out = ts.prune(tiny, UnstructuredConfig(sparsity=0.75, sparse_kernel="off"))
    for name in ("conv", "fc1", "fc2"):
        w, w0 = getattr(out, name).weight, before[f"{name}.weight"]
        assert sparsity(w) == pytest.approx(0.75, abs=1.0 / w.numel())
        thr = percentile_threshold(w0.abs(), 0.75)  # the seed's threshold-by-percentile rule
        assert bool((w0.abs()[w == 0] <= thr).all()) and bool((w0.abs()[w != 0] >= thr).all())
        assert torch.equal(w[w != 0], w0[w != 0])
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())  # input untouched


def test_global_scope_min_density_keeps_every_layer_alive(tiny):
    with torch.no_grad():
        tiny.fc2.weight.mul_(1e-4)  # global magnitude alone would empty fc2
    cfg = UnstructuredConfig(sparsity=0.9, scope="global", min_density=0.05, sparse_kernel="off")
    out = ts.prune(tiny, cfg)
    ws = [out.conv.weight, out.fc1.weight, out.fc2.weight]
    total = sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws)
    assert total == pytest.approx(0.1, abs=1e-3)
    assert float(torch.count_nonzero(out.fc2.weight)) / out.fc2.weight.numel() == pytest.approx(0.05, abs=0.01)


def test_global_keep_redistributes_clamped_budget():
    scores = [torch.zeros(100), torch.arange(1.0, 101.0)]
    keep = global_keep(scores, 0.5, 0.2)
    assert keep == [20, 80] and sum(keep) == 100
    with pytest.raises(ConfigError, match="min_density"):
        global_keep(scores, 0.9, 0.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_per_layer_override(tiny, scope):
    cfg = UnstructuredConfig(sparsity=0.8, scope=scope, sparse_kernel="off")
    out = ts.prune(tiny, cfg, select={"overrides": {"fc2": {"sparsity": 0.25}}})
    assert sparsity(out.fc2.weight) == pytest.approx(0.25, abs=1 / 320)
    with pytest.raises(ConfigError, match="sparsity"):
        ts.prune(tiny, cfg, select={"overrides": {"fc2": {"sparsity": 1.5}}})


@pytest.mark.parametrize("bad", [1.0, -0.1, 2])
def test_bad_sparsity_names_range(bad):
    with pytest.raises(ConfigError, match=r"sparsity=.*outside the allowed range \[0.0, 1.0\)"):
        UnstructuredConfig(sparsity=bad)


def test_bad_selection_and_unprunable_model(tiny):
    with pytest.raises(LayerNotFoundError, match="fc9"):
        ts.prune(tiny, UnstructuredConfig(), select={"include": ["fc9"]})
    with pytest.raises(LayerNotFoundError, match="matched no layer"):
        ts.prune(tiny, UnstructuredConfig(), select={"include": ["zz*"]})
    with pytest.raises(UnsupportedLayerError, match="no prunable layers.*Linear"):
        ts.prune(nn.Sequential(nn.ReLU(), nn.Tanh()), UnstructuredConfig())
    with pytest.raises(UnsupportedLayerError, match="bn .*BatchNorm2d"):
        ts.prune(tiny, UnstructuredConfig(), select={"types": ["BatchNorm2d"]})


@pytest.mark.parametrize("schedule", ["oneshot", "agp"])
def test_failed_mask_application_rolls_back(tiny, monkeypatch, schedule):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    real = hold_mod.set_mask
    calls = []

    def flaky(module, mask, settings=None):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(module, mask, settings)

    orig_mul = torch.Tensor.masked_fill_
    n = {"i": 0}

    def flaky_mul(self, *args):
        n["i"] += 1
        if n["i"] == 2:
            raise RuntimeError("boom")
        return orig_mul(self, *args)

    monkeypatch.setattr(hold_mod, "set_mask", flaky)
    if schedule == "oneshot":
        monkeypatch.setattr(torch.Tensor, "masked_fill_", flaky_mul)
    cfg = UnstructuredConfig(sparsity=0.5, schedule=schedule, initial_sparsity=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        ts.prepare(tiny, cfg, inplace=True)
    monkeypatch.undo()
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert not any(parametrize.is_parametrized(m) for m in tiny.modules())


def test_schedules():
    assert agp(0.9, 0, 100, initial=0.0) == 0.0
    assert agp(0.9, 100, 100) == 0.9 and agp(0.9, 80, 100, end=0.75) == 0.9
    mid = agp(0.9, 50, 100, start=0.0, end=1.0)
    assert mid == pytest.approx(0.9 + (0.0 - 0.9) * 0.5**3)
    vals = [agp(0.9, s, 100, update_every=10) for s in range(101)]
    assert vals == sorted(vals) and len(set(vals)) <= 10
    its = [iterative(0.9, s, 90, rounds=3) for s in (0, 29, 30, 60, 89, 90)]
    assert its[0] == its[1] == pytest.approx(1 - 0.1 ** (1 / 3)) and its[-1] == pytest.approx(0.9)
    assert its == sorted(its)
    # default AGP: the target is reached at half of the steps, the rest is recovery at the target
    from torchshrink.prune.unstructured import sparsity_at

    cfg = UnstructuredConfig(sparsity=0.9, schedule="agp", update_every=1)
    assert sparsity_at(cfg, 0.9, 49, 100) < 0.9 and sparsity_at(cfg, 0.9, 50, 100) == pytest.approx(0.9)
    assert sparsity_at(cfg, 0.9, 25, 100) == pytest.approx(0.9 - 0.9 * 0.5**3)
    with pytest.raises(ConfigError, match="end"):
        UnstructuredConfig(start=0.5, end=0.4)
    with pytest.raises(ConfigError, match="initial_sparsity"):
        UnstructuredConfig(sparsity=0.5, initial_sparsity=0.6)


@pytest.fixture
def mlp():
    from torchshrink.zoo.digits import DigitsMLP

    torch.manual_seed(0)
    return DigitsMLP().eval()


def _run(model, cfg, epochs=1, select=None):
    """The recipe runner's stage (prepare -> fine-tune with on_step -> finalize) on 12 small batches."""
    from torchshrink.recipe.recipe import Finetune, Stage
    from torchshrink.recipe.runner import run_stage
    from torchshrink.recipe.task import Task

    g = torch.Generator().manual_seed(0)
    train = [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(12)]
    task = Task(name="synthetic", inputs=(train[0][0],), train=train, calibration=[train[0][0]])
    stage = Stage(cfg, select, Finetune(epochs=epochs, lr=1e-3), "finetune")
    return run_stage(model, stage, task)[0]


def test_agp_with_finetune_reaches_target_and_finalizes(mlp):
    seen = []
    from torchshrink.prune import unstructured as un

    real = un.apply_masks

    def spy(model, masks, **kw):
        seen.append(sum(int(m.sum()) for m in masks.values()))
        return real(model, masks, **kw)

    un.apply_masks = spy
    try:
        cfg = UnstructuredConfig(sparsity=0.8, scope="global", schedule="agp", update_every=2, sparse_kernel="off")
        out = _run(mlp, cfg, epochs=1)
    finally:
        un.apply_masks = real
    assert len(seen) >= 4 and seen == sorted(seen, reverse=True)  # kept weights only shrink
    ws = [m.weight for m in out.modules() if isinstance(m, nn.Linear)]
    assert not any(parametrize.is_parametrized(m) for m in out.modules())
    assert sum(int(torch.count_nonzero(w)) for w in ws) / sum(w.numel() for w in ws) == pytest.approx(0.2, abs=1e-3)


def test_oneshot_zeros_are_held_during_finetune(mlp):
    out = _run(mlp, UnstructuredConfig(sparsity=0.7, sparse_kernel="off"))
    for m in out.modules():
        if isinstance(m, nn.Linear):
            assert sparsity(m.weight) == pytest.approx(0.7, abs=0.002)
            assert type(m) is nn.Linear


def test_gradient_criteria(tiny):
    with pytest.raises(DataError, match="needs gradients"):
        ts.prune(tiny, UnstructuredConfig(criterion="taylor"))
    data = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    out = ts.prune(tiny, UnstructuredConfig(criterion="taylor", sparsity=0.5, sparse_kernel="off"), data=data)
    assert sparsity(out.fc1.weight) == pytest.approx(0.5, abs=0.01)
    r1 = ts.prune(tiny, UnstructuredConfig(criterion="random", sparsity=0.5, seed=3))
    r2 = ts.prune(tiny, UnstructuredConfig(criterion="random", sparsity=0.5, seed=3))
    assert torch.equal(r1.fc1.weight, r2.fc1.weight)


def test_movement_accumulates_during_agp(mlp):
    cfg = UnstructuredConfig(sparsity=0.5, criterion="movement", schedule="agp", update_every=3, sparse_kernel="off")
    out = _run(mlp, cfg)
    assert sparsity(out.net[1].weight) > 0.3


def test_make_permanent_without_finalize(tiny):
    with pytest.raises(ConfigError, match="trains"):  # a schedule needs training: prepare / finalize
        ts.prune(tiny, UnstructuredConfig(sparsity=0.6, schedule="iterative", rounds=2))
    out = ts.prepare(tiny, UnstructuredConfig(sparsity=0.6, schedule="iterative", rounds=2))
    assert parametrize.is_parametrized(out.fc1)
    assert sparsity(out.fc1.weight) == pytest.approx(1 - 0.4 ** 0.5, abs=0.01)
    assert make_permanent(out) == ["conv", "fc1", "fc2"]
    assert type(out.fc1) is nn.Linear and sorted(out.fc1.state_dict()) == ["bias", "weight"]


def test_recipe_yaml_round_trip():
    from torchshrink.recipe.recipe import recipe_from_yaml

    r = recipe_from_yaml("""
stages:
  - kind: unstructured
    sparsity: 0.9
    scope: global
    schedule: agp
    select: {overrides: {"fc2": {sparsity: 0.5}}}
    finetune: {epochs: 2}
  - kind: nm
    n: 2
    m: 4
""")
    assert r.stages[0].config == UnstructuredConfig(sparsity=0.9, scope="global", schedule="agp")
    assert recipe_from_yaml(r.to_yaml()).to_dict() == r.to_dict()
    with pytest.raises(ConfigError, match="schedule.*'oneshot', 'iterative', 'agp'"):
        ts.config_from_dict({"kind": "unstructured", "schedule": "cubic"})


def test_a_layer_whose_weight_is_already_a_parametrization_is_left_as_it_is():
    """wav2vec2's positional convolution is weight-normed (torch parametrizations: weight = g * v / |v|): pruning
    crashed looking for '.original'. Such a layer is skipped with the reason; the others are pruned."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(4, 4, 3, padding=1)), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()
    x = torch.randn(2, 4, 16)
    for cfg in (UnstructuredConfig(sparsity=0.5), ts.NMConfig()):
        p = ts.apply(model, cfg, data=[x])
        assert p(x).shape == (2, 3)
        assert "computed by a parametrization (_WeightNorm)" in ts.report(p)[-1].skipped["0"]
        assert float((p[2].weight == 0).float().mean()) >= 0.5 and parametrize.is_parametrized(p[0], "weight")
