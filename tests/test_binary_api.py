import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.binary import (
    BinaryConv2d,
    BinaryLinear,
    BNNConfig,
    BWNConfig,
    PackedBinaryConv2d,
    PackedBinaryLinear,
    PackedTernaryLinear,
    TTQConfig,
    TWNConfig,
    XNORConfig,
    convert,
    unpack_binary,
)
from torchshrink.binary.ste import sign
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.export import saved_bytes
from torchshrink.measure import count_macs, count_params
from torchshrink.recipe import recipe_from_yaml, run_stage
from torchshrink.recipe.task import Task

torch.set_num_threads(1)
ALL = [BWNConfig, BNNConfig, XNORConfig, TWNConfig, TTQConfig]


def _x(n=5, seed=1):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cls", ALL)
def test_packed_model_matches_training_model_and_reloads(tiny, cls, tmp_path):
    prepared = torchshrink.prepare(tiny, cls(keep_first_last=False), data=[_x(8, seed=2)])
    assert isinstance(prepared.conv, BinaryConv2d) and isinstance(prepared.fc2, BinaryLinear)
    assert isinstance(tiny.conv, nn.Conv2d)  # the input model is untouched
    prepared.eval()
    packed = convert(prepared)
    x = _x()
    with torch.no_grad():
        if cls in (BNNConfig, XNORConfig):
            # layer by layer on the same input (in a chain, float rounding can flip a later sign at a tie)
            for name, shape in (("conv", (5, 3, 4, 4)), ("fc1", (5, 128)), ("fc2", (5, 32))):
                h = torch.randn(shape)
                assert torch.allclose(getattr(packed, name)(h), getattr(prepared, name)(h), atol=1e-5, rtol=1e-5)
        else:
            assert torch.allclose(packed(x), prepared(x), atol=1e-5, rtol=1e-5)
    torchshrink.save(packed, tmp_path / "m")
    loaded = torchshrink.load(tmp_path / "m", model=type(tiny)())
    with torch.no_grad():
        assert torch.equal(loaded(x), packed(x))
    if cls in (BWNConfig, BNNConfig, XNORConfig):
        assert isinstance(loaded.fc1, PackedBinaryLinear)
        # the signs on disk are the signs of the trained latent weight, exactly
        assert torch.equal(unpack_binary(loaded.fc1.weight_bits, (32, 128)), sign(prepared.fc1.weight.detach()))
    else:
        assert isinstance(loaded.fc1, PackedTernaryLinear)


def test_fully_binary_layer_output_is_integer_dot_of_signs(tiny):
    m = convert(torchshrink.prepare(tiny, BNNConfig(keep_first_last=False), data=[_x(8, seed=2)]))
    x = torch.randn(3, 128)
    layer = m.fc1
    signs_x = sign(x - layer.act_threshold)
    expected = signs_x @ layer.weight_signs().T + layer.bias
    assert torch.equal(layer(x), expected)
    # calibration set each threshold to a channel median of the real inputs (not left at 0)
    assert layer.act_threshold.abs().sum() > 0


def test_first_and_last_layers_stay_float_by_default(tiny):
    out = torchshrink.prepare(tiny, XNORConfig())
    assert type(out.conv) is nn.Conv2d and type(out.fc2) is nn.Linear and isinstance(out.fc1, BinaryLinear)
    assert torchshrink.report(out)[-1].notes["kept_float"] == ["conv", "fc2"]
    explicit = torchshrink.prepare(tiny, BWNConfig(), select={"include": ["conv"]})
    assert isinstance(explicit.conv, BinaryConv2d)


def test_large_layer_file_is_about_30x_smaller():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    packed = convert(torchshrink.prepare(net, BWNConfig(keep_first_last=False)))
    assert isinstance(packed[0], PackedBinaryLinear) and packed[0].weight_bits.numel() == 1024 * 1024 // 8
    # 1 bit per weight; the float bias and per-channel scale cost 64 of every 1088 bits
    assert saved_bytes(net) / saved_bytes(packed) > 29.5


def test_counts_follow_the_logical_layer(tiny):
    packed = convert(torchshrink.prepare(tiny, XNORConfig(keep_first_last=False), data=[_x(8, seed=2)]))
    x = (_x(2),)
    assert count_macs(packed, x) == count_macs(tiny, x)
    extra = (8 + 32 + 10) + (3 + 128 + 32)  # per-channel scales, per-input-channel thresholds
    assert count_params(packed) == count_params(tiny) + extra


class WithOddLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 3, padding="same")
        self.c1d = nn.Conv1d(4, 4, 1)
        self.b = nn.Linear(4, 2)


def test_unsupported_layers_raise_or_are_reported():
    net = WithOddLayers()
    out = torchshrink.prepare(net, BWNConfig(keep_first_last=False))
    assert set(torchshrink.report(out)[-1].notes["skipped"]) == {"refl", "same"}
    assert isinstance(out.a, BinaryConv2d) and isinstance(out.b, BinaryLinear)
    with pytest.raises(UnsupportedLayerError, match="padding_mode='reflect'.*only 'zeros'"):
        torchshrink.prepare(net, BWNConfig(), select={"include": ["refl"]})
    with pytest.raises(UnsupportedLayerError, match="type 'Conv1d'; supported: Linear, Conv2d"):
        torchshrink.prepare(net, BWNConfig(), select={"types": ["Conv1d"]})


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="threshold_factor=0.0 is outside"):
        TWNConfig(threshold_factor=0)
    with pytest.raises(ConfigError, match="act_estimator='tanh' is not allowed; allowed: 'ste', 'approx_sign'"):
        torchshrink.config_from_yaml("kind: xnor\nact_estimator: tanh\n")
    with pytest.raises(ConfigError, match="binarize\\(\\) got a config of kind 'cast'"):
        torchshrink.binarize(nn.Linear(2, 2), torchshrink.config_from_dict({"kind": "cast"}))


def test_recipe_stage_trains_then_packs(tiny):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 4, 4, generator=g) for _ in range(4)]
    batches = [(x, tiny(x).argmax(1).detach()) for x in xs]
    task = Task(name="t", inputs=(xs[0][:2],), train=batches, calibration=xs[:2])
    recipe = recipe_from_yaml(
        "stages:\n  - kind: xnor\n    keep_first_last: false\n    act_estimator: approx_sign\n"
        "    finetune: {epochs: 3, lr: 0.01}\n"
    )
    before = torchshrink.prepare(tiny, recipe.stages[0].config, data=task.calibration)
    model, history = run_stage(tiny, recipe.stages[0], task)
    assert isinstance(model.conv, PackedBinaryConv2d) and isinstance(model.fc1, PackedBinaryLinear)
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    # training moved the latent weights: packed signs differ from the untrained signs somewhere
    assert not torch.equal(model.fc1.weight_signs(), sign(before.fc1.weight.detach()))
