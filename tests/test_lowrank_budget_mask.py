import pytest
import torch
from torch import nn

import torchshrink as ts
from torchshrink.core.errors import ConfigError
from torchshrink.lowrank import BudgetConfig, SVDConfig
from torchshrink.lowrank import budget as budget_mod
from torchshrink.lowrank.common import token_mask
from torchshrink.measure import count_macs

torch.set_num_threads(2)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)) * mask[..., None]


def test_data_aware_svd_leaves_padded_tokens_out():
    torch.manual_seed(0)
    model = Tokens()
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ids[1, 3:] = 0  # pad token: a real embedding row the statistics must not see
    with torch.no_grad():
        model.emb.weight[0] = 40.0
    padded = [(ids, mask)]
    unpadded = [(ids[:1], mask[:1]), (ids[1:, :3], mask[1:, :3])]
    cfg = SVDConfig(method="rank", rank=3, data_aware=True)
    a = ts.factorize(model, cfg, select={"include": ["fc"]}, data=padded)
    b = ts.factorize(model, cfg, select={"include": ["fc"]}, data=unpadded)
    torch.testing.assert_close(a.fc[1].weight @ a.fc[0].weight, b.fc[1].weight @ b.fc[0].weight, atol=1e-5, rtol=1e-4)
    assert token_mask((ids, mask)).dtype == torch.bool and token_mask((ids, ids)) is None


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1))


def test_budget_moves_the_cut_off_layers_that_are_not_faster(monkeypatch):
    net, x = _net(), torch.randn(1, 3, 8, 8)
    timed = []

    def fake_speedup(old, new, shape, runs, channels_last):  # layer "4" (32 -> 32) never pays, the others do
        timed.append(channels_last)
        return 0.8 if (old.in_channels, old.out_channels) == (32, 32) else 2.0

    monkeypatch.setattr(budget_mod, "speedup", fake_speedup)
    out = ts.factorize(net, BudgetConfig(macs_ratio=0.5, check_latency=True, min_speedup=1.5, channels_last=True),
                       data=[x])
    rep = ts.report(out)[-1]
    assert "not 1.5x faster" in rep.skipped["4"] and "0.80x" in rep.skipped["4"]
    assert isinstance(out[4], nn.Conv2d) and rep.changed
    assert all(v["measured_speedup"] == 2.0 for v in rep.changed.values())
    assert rep.notes["budget"]["achieved_ratio"] <= 0.5 and timed and all(timed)
    assert count_macs(out, (x,)) <= 0.5 * count_macs(net, (x,)) * 1.01
    floor = ts.factorize(net, BudgetConfig(macs_ratio=0.6, min_layer_ratio=0.3), data=[x])
    assert ts.report(floor)[-1].changed and all(v["macs_ratio"] >= 0.3 for v in ts.report(floor)[-1].changed.values())
    with pytest.raises(ConfigError, match="min_speedup"):
        BudgetConfig(min_speedup=-1)
