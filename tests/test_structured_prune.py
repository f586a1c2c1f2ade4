"""Structured (channel) pruning with the traced dependency graph."""

import copy

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.prune.structured import ChannelPruneConfig, make_plan
from torchshrink.prune.structured.channel import batch_macs

torch.set_num_threads(2)


class Block(nn.Module):
    """Residual add, depthwise conv, concat, chunk and flatten in one small net."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),
                               nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU(),
                               nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16))
        self.b = nn.Conv2d(16, 8, 1)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        y = torch.cat([self.b(x), self.c(x)], dim=1)
        y1, y2 = y.chunk(2, dim=1)
        y = torch.cat([y1 * 2, y2], 1)
        y = nn.functional.adaptive_avg_pool2d(y, 2)
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.2, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)


def test_pruned_equals_original_with_removed_channels_zeroed():
    torch.manual_seed(0)
    model = Block().eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 8, 8)
    cfg = ChannelPruneConfig(amount=0.5)
    plan = make_plan(model, cfg, None, [x])
    keep = plan.keep(0.5, cfg)
    assert len(keep) >= 5  # stem/residual stream, a's two inner groups, b, c, fc1
    pruned = copy.deepcopy(model)
    plan.apply(pruned, keep)
    zeroed = copy.deepcopy(model)
    params = dict(zeroed.named_parameters())
    for gr in plan.groups:
        if gr.root not in keep:
            continue
        removed = torch.tensor([c for c in range(gr.size) if c not in set(keep[gr.root].tolist())])
        for m in gr.members:
            mod = zeroed.get_submodule(m.name.rpartition(".")[0])
            if not m.producer and m.dim == 1 and isinstance(mod, nn.Conv2d | nn.Linear) and m.name in params:
                params[m.name].data.index_fill_(1, gr.indices(plan.graph, m, removed), 0.0)
    with torch.no_grad():
        assert torch.allclose(pruned(x), zeroed(x), atol=1e-5)
        assert not torch.allclose(pruned(x), model(x), atol=1e-3)  # the removed channels did matter
    assert pruned.a[3].groups == pruned.a[3].in_channels == pruned.a[3].out_channels == 12
    assert pruned.fc1.in_features == 8 * 4 and pruned.fc2.out_features == 5
    assert pruned.stem[0].in_channels == 3


def test_macs_target_digits_cnn_and_save_load(tmp_path):
    from torchshrink.zoo.digits import DigitsCNN

    torch.manual_seed(0)
    digits_cnn = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    cfg = ChannelPruneConfig(amount=0.5, target="macs")
    pruned = torchshrink.prune(digits_cnn, cfg, data=[x])
    ratio = batch_macs(pruned, x) / batch_macs(digits_cnn, x)
    assert 0.4 <= ratio <= 0.5
    assert pruned.classifier[-1].out_features == 10
    assert digits_cnn.features[0].out_channels == 32  # input untouched
    torchshrink.save(pruned, tmp_path / "m")
    back = torchshrink.load(tmp_path / "m", model=type(digits_cnn)())
    with torch.no_grad():
        assert torch.allclose(back(x), pruned(x), atol=1e-6)


def test_round_to_ignore_and_scopes(tiny):
    x = torch.randn(2, 3, 4, 4)
    net = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(), nn.Conv2d(40, 40, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(40, 40, 1), nn.Flatten(), nn.Linear(40 * 16, 10)).eval()
    p = torchshrink.prune(net, ChannelPruneConfig(amount=0.3, round_to=8), data=[x])
    assert p[0].out_channels % 8 == 0 and p[2].out_channels % 8 == 0 and p[0].out_channels < 40
    p = torchshrink.prune(net, ChannelPruneConfig(amount=0.3, ignore=("2",)), data=[x])
    assert p[2].out_channels == 40 and p[2].in_channels == 40 and p[0].out_channels == 40
    assert p[4].out_channels == 28 and p[6].in_features == 28 * 16
    for imp in ("l2", "bn_scale", "random", "taylor"):
        for scope in ("local", "global"):
            q = torchshrink.prune(tiny, ChannelPruneConfig(amount=0.5, importance=imp, scope=scope),
                                  data=[(torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,)))])
            assert q.conv.out_channels < 8 and q(torch.randn(2, 3, 4, 4)).shape == (2, 10)


class Rolled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(self.c1(x), 1, dims=1)  # mixes channel order: the graph cannot follow it
        return self.c3(torch.relu(self.c2(y)))


def test_unknown_op_leaves_layers_unpruned_and_named():
    x = torch.randn(1, 3, 4, 4)
    m = Rolled().eval()
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    assert p.c1.out_channels == 8 and p.c2.out_channels == 4
    rep = torchshrink.report(p)[-1].notes
    assert any("c1" in u["layers"] and "roll" in u["reason"] for u in rep["unpruned"])
    only = nn.Sequential(nn.Conv2d(3, 8, 1)).eval()
    with pytest.raises(UnsupportedLayerError, match="no prunable channel group.*model output"):
        torchshrink.prune(only, ChannelPruneConfig(), data=[x])


def test_torchvision_resnet_and_vit_run_smaller(tmp_path):
    from torchshrink.models import load_model

    x = torch.randn(1, 3, 32, 32)
    m = load_model("torchvision:resnet18")
    _randomize_bn(m)  # all-zero BN biases hit a peer storage-format bug (zero nonzeros); see report
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.3), data=[x])
    assert p(x).shape == (1, 1000) and batch_macs(p, x) < 0.6 * batch_macs(m, x)
    torchshrink.save(p, tmp_path / "r")
    assert torch.allclose(torchshrink.load(tmp_path / "r")(x), p(x), atol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"amount=1.5 is outside the allowed range \[0.0, 1.0\)"):
        ChannelPruneConfig(amount=1.5)
    with pytest.raises(ConfigError, match="importance='l3' is not allowed"):
        torchshrink.config_from_dict({"kind": "channel-prune", "importance": "l3"})
    cfg = torchshrink.config_from_yaml(torchshrink.config_to_yaml(ChannelPruneConfig(ignore=("fc",), round_to=8)))
    assert cfg == ChannelPruneConfig(ignore=("fc",), round_to=8)

class _HardCoded(nn.Module):
    """A channel count written in Python inside forward: tracing cannot see it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return self.fc(y.reshape(y.shape[0], 8))


def test_a_pruned_model_that_would_not_run_is_refused_in_one_line():

    torch.manual_seed(0)
    m, x = _HardCoded(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"channel-prune refused: the pruned model was checked on the trace "
                                                    r"batch and it fails to run \(RuntimeError") as e:
        torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    assert "\n" not in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # the input is untouched


def test_a_pruned_convnext_reloads_with_its_resized_layernorm2d_and_layer_scale(tmp_path):
    """torchvision's LayerNorm2d and ConvNeXt's layer_scale parameter are rebuilt at their original size from
    the architecture; loading gives them the saved (pruned) size."""
    from torchshrink.models import load_model

    m = load_model("torchvision:convnext_tiny")
    x = torch.randn(1, 3, 32, 32)
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.3), data=[x]).eval()
    assert p.features[1][0].layer_scale.shape[0] < 96  # resized by the pruning
    torchshrink.save(p, tmp_path / "m")
    back = torchshrink.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(back(x), p(x), atol=1e-5, rtol=1e-5)


class _SizedFromOther(nn.Module):
    """As torchvision's Swin: the qkv output is reshaped with a size read from the block's input (C), so pruning
    the input's channels and not qkv's breaks the model; a second, independent MLP prunes fine."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 32)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.stem(x)
        c = h.size(-1)
        q, k, v = self.qkv(h).reshape(h.shape[0], 3, 2, c // 2).unbind(1)
        h = h + self.proj((q.softmax(-1) * k * v).reshape(h.shape[0], c))
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h)


def test_a_macs_target_rolls_back_a_group_that_breaks_a_trial_copy():
    """The MACs target bisects on pruned copies; one that does not run used to crash the whole prune."""
    torch.manual_seed(0)
    m, x = _SizedFromOther().eval(), torch.randn(4, 12)
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.3, target="macs"), data=[x]).eval()
    with torch.no_grad():
        assert p(x).shape == (4, 3)
    assert p.up.out_features < 64  # the MLP hidden channels were pruned
    rolled = torchshrink.report(p)[-1].notes["rolled_back"]
    assert rolled and any("stem" in r["layers"] for r in rolled) and "fails to run" in rolled[0]["reason"]
