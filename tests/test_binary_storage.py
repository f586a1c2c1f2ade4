"""Storage of binarized models: float16 parameters, folding into neighbours, kept-layer precision,
the compact container, and the fused C Linear kernel."""

import copy

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.binary import BNNConfig, BWNConfig, PackedBinaryConv2d, PackedBinaryLinear, XNORConfig, convert
from torchshrink.binary import kernels as K
from torchshrink.binary.fold import fold_into_neighbours
from torchshrink.binary.handler import finalize_binarize
from torchshrink.binary.ste import sign
from torchshrink.core.errors import ConfigError
from torchshrink.quant.cast import CastWrapper
from torchshrink.quant.modules import WeightOnlyLinear

torch.set_num_threads(1)
HAS_C = K.resolve_backend("auto") == "c"


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5),
    )
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("cls", [BWNConfig, XNORConfig])
def test_folding_moves_scale_and_bias_out_and_keeps_the_output(cls):
    prepared = torchshrink.prepare(_net(), cls(), data=[_x(16)]).eval()  # layers 0 and 11 stay float
    plain = convert(prepared)
    folded = convert(prepared, fold=True)
    with torch.no_grad():
        assert torch.allclose(folded(_x()), plain(_x()), atol=1e-4, rtol=1e-4)
    # conv -> BN: scale and bias went into the BN; linear -> ReLU -> float linear: scale into the next one
    assert "scale" not in dict(folded[3].named_buffers()) and folded[3].bias is None
    assert not torch.equal(folded[4].running_mean, plain[4].running_mean)
    assert not folded[9].scaled and folded[9].bias is not None
    assert not torch.equal(folded[11].weight, plain[11].weight)
    # linear -> ReLU -> binary linear: nothing can take the scale
    assert folded[7].scaled and "scale" in dict(folded[7].named_buffers())
    assert fold_into_neighbours(copy.deepcopy(folded)) == []  # nothing left to fold


def test_fold_keeps_a_scale_that_a_relu_could_not_pass():
    prepared = torchshrink.prepare(_net(), BWNConfig()).eval()
    packed = convert(prepared)
    packed[9].scale[0] = -1.0  # a negative scale does not commute with ReLU
    assert fold_into_neighbours(packed) == ["3"] and packed[9].scaled


def test_float16_parameters_round_trip_through_the_file(tmp_path):
    prepared = torchshrink.prepare(_net(), XNORConfig(keep_first_last=False), data=[_x(16)]).eval()
    packed = convert(prepared, param_dtype="float16")
    assert packed[3].scale.dtype == torch.float16 and packed[3].act_threshold.dtype == torch.float16
    torchshrink.save(packed, tmp_path / "m")
    assert (tmp_path / "m" / "model.tsz").is_file()  # packed bits go into the compact container
    loaded = torchshrink.load(tmp_path / "m")
    for a, b in zip(packed.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), packed(_x()))
        # float16 storage changes the output only slightly
        assert torch.allclose(packed(_x()), convert(prepared)(_x()), atol=0.05, rtol=0.05)


def test_finalize_stores_kept_layers_at_keep_dtype_and_reloads(tmp_path):
    net = _net()
    for kd, first, last in (("int8", CastWrapper, WeightOnlyLinear), ("float16", CastWrapper, CastWrapper),
                            ("float32", nn.Conv2d, nn.Linear)):
        cfg = BWNConfig(keep_dtype=kd)
        prepared = torchshrink.prepare(net, cfg).eval()
        with torch.no_grad():
            ref = prepared(_x())
        out = finalize_binarize(prepared, cfg)
        assert type(out[0]) is first and type(out[11]) is last
        assert torchshrink.report(out)[-1].notes["kept_float"] == ["0", "11"]
        with torch.no_grad():
            assert torch.allclose(out(_x()), ref, atol=0.05, rtol=0.05)
        torchshrink.save(out, tmp_path / kd)
        with torch.no_grad():
            assert torch.equal(torchshrink.load(tmp_path / kd)(_x()), out(_x()))


def test_finalize_whole_model_is_smaller_than_unfolded_float32():
    from torchshrink.export import saved_bytes

    net = _net()
    small = finalize_binarize(torchshrink.prepare(net, BWNConfig()).eval(), BWNConfig())
    big = finalize_binarize(torchshrink.prepare(net, BWNConfig()).eval(),
                            BWNConfig(keep_dtype="float32", param_dtype="float32", fold=False))
    assert saved_bytes(small) < saved_bytes(big) < saved_bytes(net)


def test_bad_param_dtype_is_rejected():
    with pytest.raises(ConfigError, match="param_dtype='int4'; allowed: float32, float16"):
        PackedBinaryLinear(4, 2, param_dtype="int4")
    with pytest.raises(ConfigError, match="param_dtype='bfloat16' is not allowed"):
        torchshrink.config_from_yaml("kind: bwn\nparam_dtype: bfloat16\n")


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (1, 9, 63), (2, 5, 65), (7, 13, 300), (64, 6, 4096)])
def test_fused_linear_kernel_is_exact_and_matches_the_torch_path(m, n, k):
    g = torch.Generator().manual_seed(k)
    x, w, tau = torch.randn(m, k, generator=g), sign(torch.randn(n, k, generator=g)), torch.randn(k, generator=g) * 0.3
    x[0, 0] = tau[0]  # a tie: x == tau packs as +1
    wp = K.pack_signs(w, "c")
    assert torch.equal(K.binary_linear_fused(x, tau, wp), sign(x - tau) @ w.T)
    # a whole xnor module: the fused C path and the numpy path give the same floats
    lin = PackedBinaryLinear(k, n, mode="xnor", backend="c")
    lin.weight_bits.copy_(torchshrink.binary.pack_binary(w))
    lin.scale.uniform_(0.1, 1.0, generator=g)
    lin.act_threshold.copy_(tau)
    lin.bias.normal_(generator=g)
    slow = PackedBinaryLinear(k, n, mode="xnor", backend="numpy")
    slow.load_state_dict(lin.state_dict())
    assert torch.equal(lin(x), slow(x))


@pytest.mark.skipif(not HAS_C, reason="no C compiler")
def test_conv_module_runs_c_and_numpy_to_the_same_floats():
    conv = PackedBinaryConv2d(70, 5, 3, padding=1, mode="bnn", backend="c", param_dtype="float16")
    conv.weight_bits.random_(0, 256, generator=torch.Generator().manual_seed(0))
    conv.act_threshold.normal_()
    slow = PackedBinaryConv2d(70, 5, 3, padding=1, mode="bnn", backend="numpy", param_dtype="float16")
    slow.load_state_dict(conv.state_dict())
    x = torch.randn(2, 70, 5, 6)
    assert torch.equal(conv(x), slow(x))


def test_bnn_recipe_output_still_exact_after_fold():
    prepared = torchshrink.prepare(_net(), BNNConfig(), data=[_x(16)]).eval()
    packed = convert(prepared, fold=True, param_dtype="float32")
    h = torch.randn(4, 24)
    layer = packed[9]  # linear -> ReLU -> linear: a bnn layer has no scale; its bias stays
    assert torch.equal(layer(h), sign(h - layer.act_threshold) @ layer.weight_signs().T + layer.bias)
