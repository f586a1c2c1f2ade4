"""Latency-aware allocation for channel pruning (measured time per MAC spreads the cut)."""

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import ConfigError
from torchshrink.prune.structured import ChannelPruneConfig, make_plan
from torchshrink.prune.structured.channel import batch_macs
from torchshrink.prune.structured.latency import group_time_per_mac, module_macs, module_times

torch.set_num_threads(1)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def test_module_times_pool_identical_modules_and_macs_match_counter():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 64)
    t = module_times(net, x, runs=3)
    assert set(t) == {"0", "1", "2"} and all(v > 0 for v in t.values())
    assert t["0"] == t["1"]  # same signature: one pooled figure
    macs = module_macs(net, x)
    assert macs == {"0": 4 * 64 * 64, "1": 4 * 64 * 64, "2": 4 * 64 * 8}
    assert sum(macs.values()) == batch_macs(net, x)


def test_group_weights_are_relative_time_per_mac():
    net, x = _net(), torch.randn(1, 3, 16, 16)
    plan = make_plan(net, ChannelPruneConfig(), None, [x])
    w = group_time_per_mac(net, plan.graph, plan.groups, x, runs=3)
    assert set(w) == {g.root for g in plan.groups} and len(w) == 3
    assert all(0.01 < v < 100 for v in w.values())


def test_local_ratios_scale_with_weights_and_cap_at_max_ratio():
    net, x = _net(), torch.randn(1, 3, 16, 16)
    cfg = ChannelPruneConfig(amount=0.25, allocation="latency", max_ratio=0.75)
    plan = make_plan(net, ChannelPruneConfig(amount=0.25), None, [x])
    roots = [g.root for g in plan.groups]
    plan.weights = {roots[0]: 1.0, roots[1]: 2.0, roots[2]: 4.0}
    keep = plan.keep(0.25, cfg)
    assert [len(keep[r]) for r in roots] == [24, 16, 8]  # 25%, 50%, 75% (4x capped) of 32 removed
    plan.weights = {}
    assert [len(v) for v in plan.keep(0.25, cfg).values()] == [24, 24, 24]
    # power 0 switches the weights off; global scope divides the normalised scores by the weight
    assert [len(v) for v in plan.keep(0.25, ChannelPruneConfig(amount=0.25, latency_power=0.0)).values()] == [24] * 3
    plan.weights = {roots[0]: 1.0, roots[1]: 1.0, roots[2]: 100.0}
    g = plan.keep(0.4, ChannelPruneConfig(scope="global", allocation="latency", max_ratio=0.75))
    assert len(g[roots[2]]) == 8 and len(g.get(roots[0], range(32))) > 8


def test_latency_allocation_meets_macs_target_and_reports_weights(tmp_path):
    net, x = _net(), torch.randn(1, 3, 16, 16)
    cfg = ChannelPruneConfig(amount=0.5, target="macs", allocation="latency", round_to=4)
    p = torchshrink.prune(net, cfg, data=[x])
    assert 0.4 <= batch_macs(p, x) / batch_macs(net, x) <= 0.5
    assert p(x).shape == (1, 10) and p[0].out_channels % 4 == 0
    w = torchshrink.report(p)[-1].notes["latency_weights"]
    assert sorted(w) == ["0", "3", "6"] and all(v > 0 for v in w.values())
    torchshrink.save(p, tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(torchshrink.load(tmp_path / "m")(x), p(x), atol=1e-6)


def test_latency_config_round_trip_and_errors():
    cfg = ChannelPruneConfig(allocation="latency", latency_power=2.0, scope="local")
    assert torchshrink.config_from_yaml(torchshrink.config_to_yaml(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"latency_power=-1.*outside the allowed range \[0.0, 8.0\]"):
        ChannelPruneConfig(latency_power=-1.0)
    with pytest.raises(ConfigError, match="allocation='fast' is not allowed"):
        torchshrink.config_from_dict({"kind": "channel-prune", "allocation": "fast"})
