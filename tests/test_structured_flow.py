"""Transformer units found by data flow: a user's own block with names no list knows and an FFN as
wide as the model (where a width guess picks the attention)."""

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.prune.structured import FfnPruneConfig, HeadPruneConfig, flow

torch.set_num_threads(2)


class Block(nn.Module):
    """Attention with projections named a/b/c/z, grouped KV, or one fused projection in [q|k|v] or
    per-head interleaved layout; FFN expand/shrink as wide as the model (width 32)."""

    def __init__(self, width=32, heads=4, kv=4, layout="split"):
        super().__init__()
        self.h, self.kv, self.d, self.layout = heads, kv, width // heads, layout
        if layout == "split":
            self.a = nn.Linear(width, heads * self.d)
            self.b = nn.Linear(width, kv * self.d)
            self.c = nn.Linear(width, kv * self.d)
        else:
            self.abc = nn.Linear(width, 3 * heads * self.d)
        self.z = nn.Linear(heads * self.d, width)
        self.n1, self.n2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.expand, self.shrink = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        bsz, t, _ = x.shape
        y = self.n1(x)
        if self.layout == "split":
            q, k, v = self.a(y), self.b(y), self.c(y)
        elif self.layout == "fused":
            q, k, v = self.abc(y).chunk(3, -1)
        else:  # per head: [h, 3, d]
            q, k, v = self.abc(y).view(bsz, t, -1, 3 * self.d).transpose(1, 2).chunk(3, -1)
            q, k, v = (s.transpose(1, 2).reshape(bsz, t, -1) for s in (q, k, v))
        q = q.view(bsz, t, -1, self.d).transpose(1, 2)
        k, v = (s.view(bsz, t, -1, self.d).transpose(1, 2) for s in (k, v))
        k, v = (s.repeat_interleave(q.shape[1] // k.shape[1], 1) for s in (k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d ** 0.5, -1) @ v
        x = x + self.z(att.transpose(1, 2).reshape(bsz, t, -1))
        return x + self.shrink(torch.relu(self.expand(self.n2(x))))


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.blocks = nn.ModuleList([Block(**kw) for _ in range(2)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def _net(**kw):
    torch.manual_seed(0)
    return Net(**kw).eval(), torch.randn(3, 7, 32)


def test_units_found_by_flow_not_names():
    net, x = _net(kv=2)
    u = flow.layer_units(net, list(net.blocks), x)[id(net.blocks[0])]
    (att,), (ffn,) = u.attentions, u.ffns
    assert (att.q, att.k, att.v, att.o, att.fused, att.head_dim) == ("a", "b", "c", "z", None, 8)
    assert (ffn.ups, ffn.downs) == (["expand"], ["shrink"])
    a = flow.to_attention(net.blocks[0], att)
    assert (a.heads, a.kv_heads, a.module) == (4, 2, net.blocks[0])
    p = torchshrink.prune(net, HeadPruneConfig(amount=0.5), data=[x])  # one query head of each KV group
    assert (p.blocks[0].a.out_features, p.blocks[0].b.out_features, p.blocks[0].z.in_features) == (16, 16, 16)
    assert p(x).shape == (3, 5)


def test_custom_block_prunes_by_flow_and_matches_masked_original():
    net, x = _net()
    ref = net(x)
    p = torchshrink.prune(net, HeadPruneConfig(amount=0.5, importance="l1"), data=[x])
    b = p.blocks[0]
    assert b.a.out_features == b.b.out_features == b.c.out_features == b.z.in_features == 16
    assert p(x).shape == ref.shape
    f = torchshrink.prune(net, FfnPruneConfig(amount=0.25, importance="l1"), data=[x])
    assert f.blocks[1].expand.out_features == f.blocks[1].shrink.in_features == 24
    assert f.blocks[1].z.out_features == 32  # the width guess would have cut the attention output here
    # exact: the pruned FFN equals the original with the dropped neurons' down-projection columns zeroed
    keep = f.blocks[0].expand.weight
    rows = [int((net.blocks[0].expand.weight == r).all(1).nonzero()) for r in keep]
    twin = _net()[0]
    for i, blk in enumerate(twin.blocks):
        kept = rows if i == 0 else [int((net.blocks[1].expand.weight == r).all(1).nonzero())
                                    for r in f.blocks[1].expand.weight]
        cols = torch.ones(32, dtype=torch.bool)
        cols[kept] = False
        blk.shrink.weight.data[:, cols] = 0
    assert torch.allclose(f(x), twin(x), atol=1e-5)


def test_fused_qkv_thirds_prunes_and_interleaved_refuses_by_name():
    net, x = _net(layout="fused")
    p = torchshrink.prune(net, HeadPruneConfig(amount=0.5), data=[x])
    assert p.blocks[0].abc.out_features == 48 and p(x).shape == (3, 5)
    net, x = _net(layout="per_head")
    with pytest.raises(UnsupportedLayerError, match="fused projection 'abc' interleaves q/k/v per head"):
        torchshrink.prune(net, HeadPruneConfig(amount=0.5), data=[x])
    # FFN pruning of the same model is unaffected
    assert torchshrink.prune(net, FfnPruneConfig(amount=0.5), data=[x]).blocks[0].expand.out_features == 16


def test_block_without_attention_refuses_head_prune():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(2)])

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    m, x = Mlp().eval(), torch.randn(4, 8)
    with pytest.raises(UnsupportedLayerError, match="no attention .* found by data flow"):
        torchshrink.prune(m, HeadPruneConfig(amount=0.5), data=[x])
    assert torchshrink.prune(m, FfnPruneConfig(amount=0.5), data=[x]).blocks[0][0].out_features == 8
