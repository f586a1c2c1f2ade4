import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.core.errors import ConfigError, DataError, UnsupportedLayerError
from torchshrink.quant import (
    Int8Conv2d,
    Int8DynamicConfig,
    Int8DynamicLinear,
    Int8StaticConfig,
    QuantizedAdd,
    WeightOnlyConfig,
    WeightOnlyLinear,
)

torch.set_num_threads(2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64), nn.Linear(64, 10)).eval()


def test_dynamic_int8_runs_integer_kernel_and_is_close():
    m = _mlp()
    x = torch.randn(8, 5, 64)
    q = torchshrink.quantize(m, Int8DynamicConfig(), select={"exclude": ["4"]})
    assert isinstance(q[0], Int8DynamicLinear) and q[0].qweight.dtype == torch.int8
    assert type(q[4]) is nn.Linear
    assert isinstance(m[0], nn.Linear)  # input untouched
    cos = nn.functional.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0)
    assert float(cos) > 0.999
    assert "linear_dynamic" in torchshrink.report(q)[-1].notes["backend"]


def test_dynamic_keep_float_override_is_listed():
    q = torchshrink.quantize(_mlp(), Int8DynamicConfig(), select={"overrides": {"2": {"keep_float": True}}})
    assert type(q[2]) is nn.Linear and isinstance(q[0], Int8DynamicLinear)
    assert "2" in torchshrink.report(q)[-1].skipped


def test_smoothquant_needs_data_and_checks_its_shape():
    with pytest.raises(DataError, match="calibration data"):
        torchshrink.quantize(_mlp(), Int8DynamicConfig(smooth_alpha=0.5))
    with pytest.raises(DataError, match="does not fit"):
        torchshrink.quantize(_mlp(), Int8DynamicConfig(smooth_alpha=0.5), data=[torch.randn(4, 3)])
    x = torch.randn(16, 64)
    q = torchshrink.quantize(_mlp(), Int8DynamicConfig(smooth_alpha=0.5), data=[x])
    assert q[0].smooth is not None
    assert float(nn.functional.cosine_similarity(q(x).flatten(), _mlp()(x).flatten(), dim=0)) > 0.999


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (8, 0), (8, 64)])
def test_weight_only_save_load_exact(tmp_path, bits, group):
    m = _mlp()
    q = torchshrink.quantize(m, WeightOnlyConfig(bits=bits, group_size=group))
    assert isinstance(q[0], WeightOnlyLinear)
    x = torch.randn(3, 64)
    torchshrink.save(q, tmp_path / "m")
    back = torchshrink.load(tmp_path / "m", model=_mlp())
    assert isinstance(back[0], WeightOnlyLinear)
    assert torch.equal(back[0].qweight, q[0].qweight) and torch.equal(back(x), q(x))
    err = (q[0].dequantized_weight() - m[0].weight).abs().max()
    assert float(err) <= float(q[0].scale.max()) / 2 + 1e-6


def test_int4_group128_linear_bytes_shrink():
    lin = nn.Linear(256, 256)
    wo = WeightOnlyLinear.from_float(lin, bits=4, group_size=128)
    stored = wo.qweight.numel() * wo.qweight.element_size() + wo.scale.numel() * 4
    assert stored / (lin.weight.numel() * 4) <= 0.16
    assert wo.qweight.shape == (256, 128) and wo.qweight.dtype == torch.uint8


def test_weight_only_mixed_precision_and_fallback():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 30), nn.Linear(30, 9), nn.Linear(9, 4))
    q = torchshrink.quantize(m, WeightOnlyConfig(bits=4, group_size=32), select={"overrides": {"1": {"bits": 8}}})
    assert q[0].bits == 4 and q[1].bits == 8 and q[0].group_size == 32
    # a group that does not divide the layer's width: the largest half of it that does (>= 16), else per channel
    assert isinstance(q[2], WeightOnlyLinear) and q[2].group_size == 0
    assert "per channel: group_size=32 does not divide in_features=30" in torchshrink.report(q)[-1].notes["group_size"]["2"]
    assert type(q[3]) is nn.Linear and "odd" in torchshrink.report(q)[-1].skipped["3"]  # int4 packs two per byte
    x = torch.randn(5, 64)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0) > 0.98
    from torchshrink.quant.weight_only import fitting_group

    assert [fitting_group(128, n) for n in (256, 64, 96, 48, 40, 30)] == [128, 64, 32, 16, 0, 0]
    assert fitting_group(0, 64) == 0


def test_bad_configs_raise_config_errors():
    with pytest.raises(ConfigError, match="allowed"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(ConfigError, match="allowed"):
        WeightOnlyConfig(group_size=48)
    with pytest.raises(ConfigError, match="range"):
        Int8StaticConfig(weight_bits=9)


def test_dynamic_model_survives_deepcopy_and_reload(tmp_path):
    q = torchshrink.quantize(_mlp(), Int8DynamicConfig())
    x = torch.randn(2, 64)
    y = q(x)  # builds the packed kernel weights
    torchshrink.save(q, tmp_path / "d")
    back = torchshrink.load(tmp_path / "d", model=_mlp())
    assert torch.equal(back(x), y)
    import copy

    assert torch.equal(copy.deepcopy(q)(x), y)


def test_static_int8_digits_cnn_accuracy(digits_cnn):
    from torchshrink.measure import accuracy
    from torchshrink.zoo.digits import digits_loaders

    _, val, test = digits_loaders()
    calib = [x for x, _ in list(val)[:4]]
    q = torchshrink.quantize(digits_cnn, Int8StaticConfig(), data=calib)
    convs = [m for m in q.modules() if isinstance(m, Int8Conv2d)]
    assert len(convs) == 3 and all(c.relu for c in convs)  # BN folded, ReLU fused
    assert not any(isinstance(m, nn.BatchNorm2d | nn.Conv2d) for m in q.modules())
    assert accuracy(q, test) >= accuracy(digits_cnn, test) - 0.01
    from torchshrink.measure import count_macs

    assert count_macs(q, (torch.zeros(1, 1, 8, 8),)) > 0


def test_static_residual_add_is_quantized(tiny):
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            y = torch.relu(y + x)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    m = Res().eval()
    data = [torch.randn(4, 4, 6, 6) for _ in range(3)]
    q = torchshrink.quantize(m, Int8StaticConfig(observer="percentile"), data=data)
    adds = [mm for mm in q.modules() if isinstance(mm, QuantizedAdd)]
    assert len(adds) == 1 and adds[0].relu
    x = data[0]
    assert float(nn.functional.cosine_similarity(q(x).flatten(), m(x).flatten(), dim=0)) > 0.99


def test_static_errors():
    m = _mlp()
    with pytest.raises(DataError, match="calibration data"):
        torchshrink.quantize(m, Int8StaticConfig())
    with pytest.raises(DataError, match="does not fit"):
        torchshrink.quantize(m, Int8StaticConfig(), data=[torch.randn(2, 7)])

    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UnsupportedLayerError, match="traceable"):
        torchshrink.quantize(Dyn(), Int8StaticConfig(), data=[torch.randn(2, 4)])


def test_qat_lsq_prepare_train_finalize_to_integer_modules():
    from torchshrink.quant import Int8Linear, QATConfig
    from torchshrink.quant.qat import QATLayer
    from torchshrink.recipe.recipe import Finetune
    from torchshrink.recipe.train import finetune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    y = (x[:, :4]).argmax(1)
    cfg = QATConfig(weight_bits=4, act_bits=4)
    with pytest.raises(ConfigError, match="trains"):  # QAT without training data: prepare / finalize
        torchshrink.quantize(m, cfg, data=[x])
    p = torchshrink.prepare(m, cfg, data=[x])
    assert isinstance(p[0], QATLayer) and p[0].wq.step.requires_grad
    before = p[0].wq.step.detach().clone()
    finetune(p, [(x, y)] * 4, Finetune(epochs=2, lr=1e-2), on_step=torchshrink.step)
    assert not torch.equal(before, p[0].wq.step.detach())  # the steps are learned
    with pytest.raises(DataError, match="calibration data"):  # its integer activation scales are calibrated
        torchshrink.finalize(p)
    q = torchshrink.finalize(p, data=[x])
    assert isinstance(p[0], QATLayer)  # finalize copies: the prepared model is untouched
    one_call = torchshrink.quantize(m, cfg, data=[x], train_data=[(x, y)] * 4, finetune=Finetune(epochs=2, lr=1e-2))
    assert torch.equal(one_call(x), q(x))  # apply with train_data = prepare + the shared loop + finalize
    lins = [mm for mm in q.modules() if isinstance(mm, Int8Linear)]
    assert len(lins) == 2 and lins[0].relu
    assert int(lins[0].qweight.abs().max()) <= 7  # 4-bit grid kept
    assert float(nn.functional.cosine_similarity(q(x).flatten(), p(x).flatten(), dim=0)) > 0.98
    with pytest.raises(ConfigError, match="range"):
        QATConfig(act_bits=1)
