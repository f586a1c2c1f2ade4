import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchshrink as ts
from torchshrink.core import state
from torchshrink.core.errors import ConfigError, DataError, UnsupportedLayerError
from torchshrink.lowrank import (
    BudgetConfig,
    CPConfig,
    SeparableConfig,
    SVDConfig,
    Tucker2Config,
    dense_weight,
    energy_rank,
    factorize_cp,
    factorize_separable,
    factorize_tucker2,
    svd_factors,
    tail_energy,
    vbmf_rank,
)
from torchshrink.measure import count_macs

torch.set_num_threads(2)


@settings(max_examples=12, deadline=None)
@given(m=st.integers(2, 24), n=st.integers(2, 24), data=st.data())
def test_svd_error_equals_tail_singular_energy(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 100 + n), dtype=torch.float64)
    a, b = svd_factors(w, r)
    err = float((w - b @ a).pow(2).sum())
    s = torch.linalg.svdvals(w)
    assert err == pytest.approx(tail_energy(s, r), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(padding=2, dilation=2, padding_mode="reflect"),
                                dict(padding=(1, 0), bias=False)])
def test_tucker2_full_rank_reproduces_conv(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, **kw)
    x = torch.randn(2, 6, 9, 9)
    seq = factorize_tucker2(conv, 10, 6)
    assert len(seq) == 3 and seq[0].kernel_size == (1, 1) and seq[1].kernel_size == (3, 3)
    torch.testing.assert_close(seq(x), conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_weight(seq).float(), conv.weight.detach(), atol=1e-6, rtol=1e-5)


def test_cp_and_separable_at_full_rank_reproduce_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, 3, stride=(2, 1), padding=1)
    x = torch.randn(2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # plant an exact CP rank-3 kernel
        conv.weight.copy_(torch.einsum("or,ir,kr,lr->oikl", *(torch.randn(d, 3, generator=g) for d in (5, 4, 3, 3))))
    cp = factorize_cp(conv, 3, n_iter=40)
    assert [m.groups for m in cp] == [1, 3, 3, 1]
    assert (cp(x) - conv(x)).abs().max() < 1e-3 * conv(x).abs().max()
    sep = factorize_separable(conv, 5)  # multiplier = min(O, k*k): exact
    torch.testing.assert_close(sep(x), conv(x), atol=1e-5, rtol=1e-5)


def test_separable_rank1_is_the_least_squares_optimum():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    sep = factorize_separable(conv, 1)
    err = float((dense_weight(sep) - conv.weight.detach().double()).pow(2).sum())
    best = sum(tail_energy(torch.linalg.svdvals(conv.weight[:, i].double().reshape(8, 9)), 1) for i in range(3))
    assert err == pytest.approx(best, rel=1e-6)


def test_energy_and_vbmf_rank_recover_planted_rank():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(120, 7, generator=g) @ torch.randn(7, 200, generator=g)
    noisy = low + 0.05 * torch.randn(120, 200, generator=g)
    assert vbmf_rank(noisy) == 7
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert energy_rank(s, 9 / 14) == 1 and energy_rank(s, 13 / 14) == 2 and energy_rank(s, 1.0) == 3


def test_bad_input_gives_clear_errors(tiny):
    with pytest.raises(ConfigError, match=r"energy=1\.5.*\(0\.0, 1\.0\]"):
        SVDConfig(method="energy", energy=1.5)
    with pytest.raises(ConfigError, match="rank=0.*rank >= 1"):
        SVDConfig(method="rank", rank=0)
    with pytest.raises(ConfigError, match=r"fc2.*rank=40.*\[1, 10\]"):
        ts.factorize(tiny, SVDConfig(method="rank", rank=40), select={"include": ["fc2"]})
    with pytest.raises(UnsupportedLayerError, match="svd cannot factorize layer 'conv' of type Conv2d"):
        ts.factorize(tiny, SVDConfig(), select={"types": ["Conv2d"]})
    with pytest.raises(UnsupportedLayerError, match="tucker2.*'bn' of type BatchNorm2d"):
        ts.factorize(tiny, Tucker2Config(), select={"types": ["BatchNorm2d"]})
    with pytest.raises(DataError, match="data_aware=True needs calibration"):
        ts.factorize(tiny, SVDConfig(data_aware=True))


def test_grouped_conv_skipped_and_larger_layers_listed():
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 2, 1))
    out = ts.factorize(net, Tucker2Config(ratio=0.5))
    rep = ts.report(out)[-1]
    assert "grouped conv" in rep.skipped["0"]
    assert "1" in rep.changed and rep.changed["1"]["macs_ratio"] <= 0.5
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[1], nn.Sequential)
    fused = ts.factorize(net, Tucker2Config(method="rank", rank=2, no_gain="fuse"), select={"include": ["2"]})
    assert "larger" in ts.report(fused)[-1].skipped["2"] and isinstance(fused[2], nn.Conv2d)
    assert not torch.equal(fused[2].weight, net[2].weight)  # holds the rank-2 approximation


def test_svd_ratio_halves_params_and_save_load_round_trips(tiny, tmp_path):
    out = ts.factorize(tiny, SVDConfig(ratio=0.5), select={"include": ["fc1"]})
    assert isinstance(out.fc1, nn.Sequential) and out.fc1[0].out_features == int(0.5 * 128 * 32 / 160)
    p = sum(x.numel() for x in out.fc1.parameters() if x.dim() == 2)
    assert p <= 0.5 * 128 * 32
    x = torch.randn(2, 3, 4, 4)
    ts.save(out, tmp_path / "m")
    back = ts.load(tmp_path / "m", model=type(tiny)())
    assert state.get(back.fc1, "lowrank") == "svd"
    torch.testing.assert_close(back(x), out(x))


def test_data_aware_svd_lowers_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.randn(256, 32) * torch.linspace(0.05, 3, 32)  # anisotropic inputs
    model = nn.Sequential(lin)
    plain = ts.factorize(model, SVDConfig(method="rank", rank=8))
    aware = ts.factorize(model, SVDConfig(method="rank", rank=8, data_aware=True), data=[x])
    with torch.no_grad():
        e_plain = float((plain(x) - model(x)).pow(2).mean())
        e_aware = float((aware(x) - model(x)).pow(2).mean())
    assert e_aware < 0.8 * e_plain


def test_budget_spends_mac_target_and_lists_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 36, 64))
    x = torch.randn(1, 3, 6, 6)
    out = ts.factorize(net, BudgetConfig(macs_ratio=0.5), data=[x])
    rep = ts.report(out)[-1]
    assert rep.notes["budget"]["achieved_ratio"] <= 0.5
    sel_before = count_macs(net, (x,))
    assert count_macs(out, (x,)) <= 0.5 * sel_before * 1.01
    assert rep.changed and all(isinstance(v, str) for v in rep.skipped.values())
    with pytest.raises(DataError, match="needs an example input"):
        ts.factorize(net, BudgetConfig())


def test_configs_round_trip_and_recipe_with_finetune():
    for cfg in (SVDConfig(method="energy", energy=0.8), Tucker2Config(rank=4, method="rank"),
                CPConfig(ratio=0.3), SeparableConfig(multiplier=2), BudgetConfig(macs_ratio=0.4)):
        assert ts.config_from_yaml(ts.config_to_yaml(cfg)) == cfg
    from torchshrink.recipe import recipe_from_yaml, run_stage, task_for
    from torchshrink.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN().eval()  # untrained: the structure and the loop are under test, not accuracy
    state.put(model, source="zoo:digits-cnn")
    recipe = recipe_from_yaml("""
stages:
  - kind: tucker2
    ratio: 0.5
    select: {include: ["features.3", "features.7"]}
    finetune: {epochs: 1, lr: 0.001}
""")
    task = task_for(model)
    new, hist = run_stage(model, recipe.stages[0], task)
    assert isinstance(new.features[3], nn.Sequential) and len(new.features[3]) == 3
    assert len(hist) == 1 and hist[0]["loss"] == hist[0]["loss"]  # ran one epoch, finite loss


def test_separable_data_fit_lowers_output_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(16, 1, 6, 6).repeat(1, 4, 1, 1) + 0.05 * torch.randn(16, 4, 6, 6)  # correlated channels
    by_weights = ts.factorize(net, SeparableConfig())
    by_data = ts.factorize(net, SeparableConfig(fit="data"), data=[x])
    with torch.no_grad():
        e_w = float((by_weights(x) - net(x)).pow(2).mean())
        e_d = float((by_data(x) - net(x)).pow(2).mean())
    assert e_d < 0.8 * e_w
    with pytest.raises(ConfigError, match=r"multiplier=10 is too large.*\[1, 8\]"):
        ts.factorize(net, SeparableConfig(multiplier=10))


def test_tucker2_gram_solver_matches_tensorly():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1)
    x = torch.randn(2, 12, 6, 6)
    a = factorize_tucker2(conv, 6, 5)
    b = factorize_tucker2(conv, 6, 5, solver="tensorly")
    with torch.no_grad():
        ea, eb = float((a(x) - conv(x)).pow(2).mean()), float((b(x) - conv(x)).pow(2).mean())
    assert ea == pytest.approx(eb, rel=0.05)
    assert ts.factorize(nn.Sequential(conv), Tucker2Config(solver="tensorly"))[0][1].in_channels > 0


def test_calibration_tuples_are_all_model_inputs():
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a * b)

    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.rand(8, 16)
    # two float tensors read as (inputs, labels); several inputs are ((a, b), {kwargs}) (torchshrink.core.data)
    out = ts.factorize(TwoIn(), SVDConfig(method="rank", rank=4, data_aware=True), data=[((a, b), {})])
    assert out.fc[0].out_features == 4
