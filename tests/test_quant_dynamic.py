"""INT8 dynamic Linear with per-token activation scales."""

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import ConfigError
from torchshrink.quant import Int8DynamicConfig, Int8DynamicLinear

torch.set_num_threads(2)


def _lin() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128)).eval()


def _row_rel_err(q: nn.Module, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        ref = m(x)
        return (q(x) - ref).norm(dim=-1) / ref.norm(dim=-1)


def test_per_token_scales_protect_rows_from_an_outlier_token():
    m = _lin()
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
    x[0] *= 100  # one outlier token
    tensor = torchshrink.quantize(m, Int8DynamicConfig(activation="tensor", reduce_range="on"))
    token = torchshrink.quantize(m, Int8DynamicConfig(activation="token", reduce_range="on"))
    assert token[0].activation == "token" and "per-token" in torchshrink.report(token)[-1].notes["backend"]
    e_tensor, e_token = _row_rel_err(tensor, m, x), _row_rel_err(token, m, x)
    assert float(e_tensor[1:].max()) > 0.3  # the shared grid is too coarse for the ordinary rows
    assert float(e_token[1:].max()) < 0.05
    assert float(e_token[0]) < 0.05


@pytest.mark.parametrize("smooth", [False, True])
def test_per_token_leaves_input_alone_and_zero_rows_give_bias(smooth):
    m = _lin()
    x = torch.randn(6, 3, 256)
    x[1, 2] = 0.0
    data = [x] if smooth else None
    q = torchshrink.quantize(m, Int8DynamicConfig(activation="token", smooth_alpha=0.5 if smooth else 0.0), data=data)
    assert (q[0].smooth is not None) == smooth
    before = x.clone()
    y = q(x)
    assert torch.equal(x, before)
    assert y.shape == (6, 3, 128)
    assert torch.allclose(y[1, 2], m[0].bias, atol=1e-6)
    assert float(_row_rel_err(q, m, x).reshape(-1)[torch.arange(18) != 5].max()) < 0.05


def test_per_token_save_load_round_trip(tmp_path):
    m = _lin()
    q = torchshrink.quantize(m, Int8DynamicConfig(activation="token"))
    x = torch.randn(5, 256)
    torchshrink.save(q, tmp_path / "q")
    back = torchshrink.load(tmp_path / "q", model=_lin())
    assert isinstance(back[0], Int8DynamicLinear) and back[0].activation == "token"
    assert torch.equal(back[0].qweight, q[0].qweight)
    assert torch.equal(back(x), q(x))


def test_activation_granularity_is_checked():
    with pytest.raises(ConfigError, match="activation"):
        Int8DynamicConfig(activation="row")
    with pytest.raises(ConfigError, match="allowed: tensor, token"):
        Int8DynamicLinear(4, 4, activation="row")
    # a module saved before the option existed has no 'activation' init arg: it loads per tensor
    assert Int8DynamicLinear(4, 4).activation == "tensor"
