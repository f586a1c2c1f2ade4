import pytest
import torch
import torch.nn.functional as F

from torchshrink.binary import kernels as K
from torchshrink.binary.ste import sign
from torchshrink.core.errors import ConfigError

torch.set_num_threads(1)
BACKENDS = ["numpy"] + (["c"] if K.resolve_backend("auto") == "c" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 1), (1, 7, 63), (3, 5, 65), (64, 9, 130), (2, 4, 256), (5, 3, 1000)])
def test_linear_kernel_equals_float_of_signs(backend, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    x, w = torch.randn(m, k, generator=g), sign(torch.randn(n, k, generator=g))
    x[0, 0] = 0.0  # sign(0) = +1 in float and in bits
    got = K.binary_linear(x, K.pack_linear_weight(w, backend), k, backend)
    assert got.dtype == torch.int32
    assert torch.equal(got, (sign(x) @ w.T).to(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("b", "c", "h", "o", "ks", "stride", "pad", "dil"),
    [(1, 3, 5, 4, 3, 1, 1, 1), (2, 70, 7, 5, 3, 2, 1, 1), (1, 64, 6, 8, 3, 1, 2, 2), (3, 5, 6, 2, 1, 1, 0, 1),
     (1, 130, 4, 6, 2, 1, 0, 1)],
)
def test_conv_kernel_equals_float_of_signs(backend, b, c, h, o, ks, stride, pad, dil):
    g = torch.Generator().manual_seed(c)
    x, w = torch.randn(b, c, h, h + 1, generator=g), sign(torch.randn(o, c, ks, ks, generator=g))
    ref = F.conv2d(sign(x), w, stride=stride, padding=pad, dilation=dil)  # zero padding of the signs
    corr = K.padding_correction(w, h, h + 1, (stride,) * 2, (pad,) * 2, (dil,) * 2) if pad else None
    got = K.binary_conv2d(x, K.pack_conv_weight(w, backend), c, (ks, ks), (stride,) * 2, (pad,) * 2, (dil,) * 2,
                          corr, backend)
    assert got.shape == ref.shape
    assert torch.equal(got, ref.to(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_signs_pads_with_zero_bits(backend):
    packed = K.pack_signs(torch.ones(2, 65), backend)
    assert packed.shape == (2, 2)
    assert packed[0, 0].item() == -1 and packed[0, 1].item() == 1  # all 64 bits set; then one bit


def test_backends_agree_and_bad_backend_is_rejected():
    a, b = K.pack_signs(torch.randn(4, 100), "numpy"), K.pack_signs(torch.randn(6, 100), "numpy")
    for be in BACKENDS:
        assert torch.equal(K.xnor_gemm(a, b, 100, be), K.xnor_gemm(a, b, 100, "numpy"))
    with pytest.raises(ConfigError, match="allowed: auto, c, numpy"):
        K.resolve_backend("cuda")


def test_auto_backend_is_chosen_by_measurement_and_matches_numpy():
    from torchshrink.binary.modules import PackedBinaryLinear

    torch.manual_seed(0)
    auto = PackedBinaryLinear(130, 17, bias=False, mode="bnn", backend="auto")
    auto.weight_bits.random_(0, 256)
    forced = PackedBinaryLinear(130, 17, bias=False, mode="bnn", backend="numpy")
    forced.load_state_dict(auto.state_dict())
    x = torch.randn(3, 130)
    assert torch.equal(auto(x), forced(x))
    (choice,) = [v for k, v in auto._cache.items() if isinstance(k, tuple) and k[0] == "backend"]
    assert choice in ("c", "numpy")
