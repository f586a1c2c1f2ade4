import pytest
import torch
from torch import nn

import torchshrink as ts
from torchshrink.core.errors import ConfigError, DataError, LayerNotFoundError
from torchshrink.lowrank import SVDConfig
from torchshrink.lowrank.refit import RefitSettings, refit, refit_blocks


class Block(nn.Module):
    """Embedding -> two FFN-like blocks (Linear, GELU, Linear) with residuals, tokenized input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.up0, self.down0 = nn.Linear(12, 32), nn.Linear(32, 12)
        self.up1, self.down1 = nn.Linear(12, 32), nn.Linear(32, 12)
        self.act = nn.GELU()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.down0(self.act(self.up0(h)))
        h = h + self.down1(self.act(self.up1(h)))
        return h * mask[..., None]


def _setup():
    torch.manual_seed(0)
    model = Block().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 40, (8, 10), generator=g), torch.ones(8, 10, dtype=torch.long)) for _ in range(4)]
    student = ts.factorize(model, SVDConfig(method="rank", rank=3), select={"include": ["re:up\\d", "re:down\\d"]})
    return model, student, data


def _block_error(student, teacher, data, i):
    ids, mask = data[0]
    with torch.no_grad():
        x = teacher.emb(ids).reshape(-1, 12)
        t = getattr(teacher, f"down{i}")(teacher.act(getattr(teacher, f"up{i}")(x)))
        s = getattr(student, f"down{i}")(student.act(getattr(student, f"up{i}")(x)))
    return float((s - t).pow(2).sum() / t.pow(2).sum())


def test_refit_lowers_each_blocks_local_error_and_touches_only_its_chains():
    model, student, data = _setup()
    emb_before = student.emb.weight.clone()
    err0 = _block_error(student, model, data, 0)
    res = refit(student, model, [["up0", "act", "down0"]], data, RefitSettings(steps=300, lr=1e-2, holdout=0.25))
    r = res["up0 -> act -> down0"]
    assert r["rows"] == 240  # 4 batches x 80 real tokens, a quarter held out
    assert r["error_after"] < 0.5 * r["error_before"]
    assert _block_error(student, model, data, 0) < 0.5 * err0  # the layer's own error, measured independently
    assert torch.equal(student.emb.weight, emb_before) and student.up0[0].weight.shape == (3, 12)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the teacher is untouched


def test_refit_with_student_inputs_fits_chains_in_order_and_skips_padding():
    model, student, data = _setup()
    data = [(ids, torch.cat([torch.ones(8, 6), torch.zeros(8, 4)], 1).long()) for ids, _ in data]
    res = refit(student, model, [["up0", "act", "down0"], ["up1", "act", "down1"]], data,
                RefitSettings(steps=200, lr=1e-2, inputs="student", holdout=0.0))
    assert list(res) == ["up0 -> act -> down0", "up1 -> act -> down1"]
    assert all(v["rows"] == 4 * 8 * 6 for v in res.values())  # padded positions are not rows
    assert all(v["error_after"] < 0.7 * v["error_before"] for v in res.values())


def test_refit_rejects_bad_input():
    model, student, data = _setup()
    with pytest.raises(LayerNotFoundError, match="up9"):
        refit(student, model, [["up9"]], data)
    with pytest.raises(ConfigError, match="different"):
        refit(model, model, [["up0"]], data)
    with pytest.raises(DataError, match="calibration batches"):
        refit(student, model, [["up0"]], [])
    with pytest.raises(ConfigError, match="at least one block"):
        refit_blocks(student, model, [], data)
    with pytest.raises(ConfigError, match="refit.inputs"):
        RefitSettings(inputs="both")
    with pytest.raises(ConfigError, match="refit.lr"):
        RefitSettings(lr=0.0)


def test_global_allocation_keeps_the_total_weight_ratio_and_cuts_where_error_is_cheap():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with torch.no_grad():  # layer 0 is nearly rank 4, layer 2 has a flat spectrum
        net[0].weight.copy_(torch.randn(32, 4, generator=g) @ torch.randn(4, 32, generator=g)
                            + 0.01 * torch.randn(32, 32, generator=g))
        net[2].weight.copy_(torch.randn(32, 32, generator=g))
    out = ts.factorize(net, SVDConfig(ratio=0.5, allocation="global"))
    weights = [p.numel() for i in (0, 2) if isinstance(out[i], nn.Sequential) for p in out[i].parameters() if p.dim() == 2]
    dense = sum(net[i].weight.numel() for i in (0, 2) if not isinstance(out[i], nn.Sequential))
    assert sum(weights) + dense <= 0.5 * 2 * 32 * 32
    assert isinstance(out[0], nn.Sequential) and out[0][0].out_features <= 8  # the cut went to the low-rank layer
    assert not isinstance(out[2], nn.Sequential) or out[2][0].out_features > 8
    plain = ts.factorize(net, SVDConfig(ratio=0.5))  # per layer: both at rank 8
    x = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        ref = net(x)
        assert (out(x) - ref).pow(2).sum() < (plain(x) - ref).pow(2).sum()
    with pytest.raises(ConfigError, match="method='ratio'"):
        SVDConfig(method="energy", allocation="global")


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.up, self.down, self.act = nn.Linear(12, 32), nn.Linear(32, 12), nn.GELU()

    def forward(self, h: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        return (self.norm(h + self.down(self.act(self.up(h))) + shift),)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h, shift=mask[..., None].float())[0]  # a keyword input the replay must keep
        return h


@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_refit_blocks_lowers_block_output_error_and_trains_only_the_factors(inputs):
    torch.manual_seed(0)
    model = Stack().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 40, (8, 10), generator=g), torch.ones(8, 10, dtype=torch.long)) for _ in range(6)]
    student = ts.factorize(model, SVDConfig(method="rank", rank=2), select={"include": ["re:up$", "re:down$"]})
    norm = student.layers[0].norm.weight.clone()
    res = refit_blocks(student, model, ["layers.0", "layers.1"], data,
                       RefitSettings(steps=150, lr=1e-2, inputs=inputs, holdout=0.34))
    assert [v["batches"] for v in res.values()] == [4, 4]
    assert all(v["error_after"] < 0.6 * v["error_before"] for v in res.values())
    assert torch.equal(student.layers[0].norm.weight, norm)  # only the factorized modules were trained
    with torch.no_grad():  # and the whole model got closer to the original
        fresh = ts.factorize(model, SVDConfig(method="rank", rank=2), select={"include": ["re:up$", "re:down$"]})
        ref = model(*data[0])
        assert (student(*data[0]) - ref).pow(2).sum() < 0.6 * (fresh(*data[0]) - ref).pow(2).sum()
