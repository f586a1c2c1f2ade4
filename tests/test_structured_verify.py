"""No silently broken model leaves channel-prune: the custom-module set (#19) each prunes or refuses;
a group the tracer misjudges is caught by running the pruned model against the masked original and
rolled back; channels are followed through channels-last pad, movedim and unflatten."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchshrink
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.prune.structured import ChannelPruneConfig, rules
from torchshrink.prune.structured.channel import batch_macs

torch.set_num_threads(2)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3)
        self.fc1, self.fc2, self.head = nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return self.head(self.c2(x * w[:, :, None, None]).mean((2, 3)))


class ChunkCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.a, self.b, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = self.c1(x).chunk(2, dim=1)
        return self.c2(torch.cat([self.a(a), self.b(b)], 1)).mean((2, 3))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.shared, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.shared(F.relu(self.shared(F.relu(self.c1(x))))))
        return self.out(x).mean((2, 3))


class TiedEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.fc2 = nn.Embedding(50, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.lm = nn.Linear(16, 50, bias=False)
        self.lm.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.lm(h + self.fc2(F.gelu(self.fc(h))))


class DepthwisePointwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw, self.pw, self.fc = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.pw(F.relu(self.dw(F.relu(self.bn(self.c1(x)))))).mean((2, 3)))


class TwoBranchResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.b2, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.fc((x + self.b1(x) + self.b2(x)).mean((2, 3)))


class LinearOnFlatConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc, self.out = nn.Linear(12 * 4 * 4, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.c2(F.relu(self.c1(x)))), 1))))


class PythonSizedReshape(nn.Module):
    """4 groups written in Python: pruning the conv would change what each group holds."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.c1(x).mean((2, 3))
        return self.fc(x * x.view(x.shape[0], 4, -1).softmax(-1).view(x.shape[0], -1))


IMG = (2, 3, 8, 8)
CASES = {
    "squeeze-excitation": (SqueezeExcite, IMG), "chunk/cat": (ChunkCat, IMG), "module called twice": (CalledTwice, IMG),
    "tied embeddings": (TiedEmbeddings, None), "depthwise->pointwise": (DepthwisePointwise, IMG),
    "two-branch residual": (TwoBranchResidual, IMG), "linear on flattened conv": (LinearOnFlatConv, IMG),
}


def _input(shape):
    return torch.randint(0, 50, (2, 7)) if shape is None else torch.randn(*shape)


@pytest.mark.parametrize("name", list(CASES))
def test_custom_module_set_prunes_and_runs(name):
    cls, shape = CASES[name]
    torch.manual_seed(0)
    m, x = cls().eval(), _input(shape)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    assert p(x).shape == m(x).shape
    assert batch_macs(p, x) < 0.9 * batch_macs(m, x)
    notes = torchshrink.report(p)[-1].notes
    assert notes["pruned_groups"] >= 1 and notes["rolled_back"] == []
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    p2 = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x[:1]])  # another batch size runs too
    assert p2(x).shape == m(x).shape


def test_python_sized_reshape_is_refused_naming_the_op():
    m, x = PythonSizedReshape().eval(), torch.randn(*IMG)
    with pytest.raises(UnsupportedLayerError, match=r"reshape \(2, 16\) -> \(2, 4, 4\)"):
        torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])


class SizeFromAnotherTensor(nn.Module):
    """Swin's pattern: a reshape of one tensor uses a width read from ANOTHER tensor's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.fc_in, self.qkv, self.out = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 5)

    def forward(self, x):
        h = self.fc_in(F.relu(self.pre(x)))
        n, length, c = h.shape
        q = self.qkv(h).reshape(n, length, 3, 4, c // 4).sum(2).flatten(2)
        return self.out(q)


def test_group_that_breaks_the_model_is_rolled_back_with_the_reason():
    torch.manual_seed(0)
    m, x = SizeFromAnotherTensor().eval(), torch.randn(2, 5, 8)
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    assert p(x).shape == (2, 5, 5) and p(x[:1]).shape == (1, 5, 5)
    notes = torchshrink.report(p)[-1].notes
    assert notes["pruned_groups"] == 1 and p.pre.out_features == 4 and p.fc_in.out_features == 16
    (rb,) = notes["rolled_back"]
    assert "fc_in" in rb["layers"] and "fails to run" in rb["reason"]
    assert any(u["reason"].startswith("rolled back:") for u in notes["unpruned"])


class Roll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.roll(F.relu(self.a(x)), 1, dims=1))


def test_wrong_rule_is_caught_by_the_masked_original(monkeypatch):
    """A rule that calls torch.roll elementwise is wrong across channels; the pruned model still runs
    with the right shape, so only the comparison with the masked original can see it."""
    torch.manual_seed(0)
    m, x = Roll().eval(), torch.randn(4, 6)
    monkeypatch.setattr(rules, "_ELEMENTWISE", rules._ELEMENTWISE | {"roll"})
    with pytest.raises(UnsupportedLayerError, match="differ from the original with the same channels zeroed"):
        torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    monkeypatch.undo()  # the real rules block roll over channels: nothing to prune, said in one line
    with pytest.raises(UnsupportedLayerError, match="op 'roll'"):
        torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])


class ChannelsLast(nn.Module):
    """[N, H, W, C] with F.pad on H and W (Swin's window padding), movedim and unflatten."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mlp, self.proj = nn.Conv2d(3, 16, 2, stride=2), nn.Linear(16, 16), nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.embed(x).permute(0, 2, 3, 1)  # N, H, W, C
        h = F.pad(h, (0, 0, 0, 1, 0, 1))  # pads W and H, never C
        h = F.relu(self.mlp(h))
        n, hh, ww, c = h.shape
        h = h.flatten(1, 2).unflatten(1, (hh, ww))  # Python-computed sizes, spatial only
        h = torch.movedim(h, -1, 1)  # back to N, C, H, W
        return self.fc(self.proj(h).mean((2, 3)))


def test_channels_last_pad_movedim_unflatten_are_followed():
    torch.manual_seed(0)
    m, x = ChannelsLast().eval(), torch.randn(2, 3, 8, 8)
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    notes = torchshrink.report(p)[-1].notes
    assert notes["rolled_back"] == []
    assert (p.embed.out_channels, p.mlp.out_features, p.proj.out_channels) == (8, 8, 4)
    assert p(x).shape == (2, 4)


def test_unflatten_restores_channels_after_flatten():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.c1(x)
            n, c, hh, ww = h.shape
            return self.c2(torch.relu(h.flatten(1)).view(n, c, hh, ww)).mean((2, 3))

    m, x = M().eval(), torch.randn(2, 3, 6, 6)
    p = torchshrink.prune(m, ChannelPruneConfig(amount=0.5), data=[x])
    assert p.c1.out_channels == 4 and p(x).shape == (2, 4)


def test_reference_checks_another_batch_size_and_another_spatial_or_sequence_size():
    from torchshrink.prune.structured.verify import reference

    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    shapes = [tuple(b.shape) for b, _ in reference(conv, torch.randn(2, 3, 16, 16))]
    assert shapes == [(2, 3, 16, 16), (1, 3, 16, 16), (2, 3, 12, 12)]
    emb = nn.Embedding(10, 4)
    refs = reference(emb, {"input": torch.randint(0, 10, (2, 8))})
    assert [tuple(b["input"].shape) for b, _ in refs] == [(2, 8), (1, 8), (2, 6)]
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))  # cannot take another size: left out
    assert [tuple(b.shape) for b, _ in reference(fixed, torch.randn(2, 3, 16, 16))] == [(2, 3, 16, 16), (1, 3, 16, 16)]


class FixedLength(nn.Module):
    """Token model whose forward may need an exact number of positions (a Python constant)."""

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        self.length = length
        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 4)

    def forward(self, ids):
        if self.length is not None and ids.shape[1] != self.length:
            raise RuntimeError(f"needs {self.length} positions")
        return self.fc(self.emb(ids))


def test_probe_batch_is_cut_to_two_rows_of_64_tokens_where_the_model_takes_it():
    from torchshrink.prune.structured.verify import probe_batch

    ids = torch.randint(0, 50, (16, 512))
    small = probe_batch(FixedLength(), [ids])
    assert small.shape == (2, 64) and torch.equal(small, ids[:2, :64])
    whole = probe_batch(FixedLength(100), [ids[:, :100]])  # a model that needs its inputs whole keeps them
    assert whole.shape == (16, 100)
    images = torch.randn(8, 3, 32, 32)  # float inputs keep their size; only rows are cut
    assert probe_batch(nn.Conv2d(3, 4, 3), [images]).shape == (2, 3, 32, 32)
