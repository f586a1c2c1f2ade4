import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchshrink as ts
from torchshrink.cluster import ClusteredLayer, KMeansConfig, kmeans_1d
from torchshrink.cluster.entropy import decode_codes, encode_codes
from torchshrink.core.errors import ConfigError


def test_kmeans_1d_finds_well_separated_clusters():
    v = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)]) + 0.01 * torch.randn(100)
    c, idx = kmeans_1d(v, 3)
    assert torch.allclose(c, torch.tensor([-1.0, 0.5, 2.0]), atol=0.01)
    assert idx.bincount().tolist() == [50, 30, 20]


def test_clustered_layer_keeps_zeros_and_uses_k_values():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 30)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0
    m = ClusteredLayer.from_layer(lin, bits=3, init="linear", keep_zeros=True, iters=30)
    w = m.weight_tensor()
    assert torch.equal(w == 0, lin.weight == 0)  # pruned stays pruned, nothing else becomes zero
    assert torch.unique(w).numel() <= 8
    assert (w - lin.weight).abs().max() < 0.1
    x = torch.randn(4, 40)
    assert torch.allclose(m(x), torch.nn.functional.linear(x, w, lin.bias))


def test_centroid_gradient_is_the_sum_over_its_cluster():
    lin = torch.nn.Linear(6, 2, bias=False)
    m = ClusteredLayer.from_layer(lin, bits=1, init="linear", keep_zeros=False, iters=10)
    x = torch.randn(5, 6)
    m.train()
    m(x).sum().backward()
    dense_grad = x.sum(0).expand(2, 6)  # d(sum(x W^T))/dW
    expected = torch.zeros(2).index_add_(0, m.codes.long().reshape(-1), dense_grad.reshape(-1))
    assert torch.allclose(m.centroids.grad, expected, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 8), st.sampled_from([torch.uint8, torch.int16]))
def test_entropy_coding_round_trip_is_exact(n, bits, dtype):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 2 ** bits, (n,), generator=g).to(dtype)
    parts = encode_codes(codes)
    back = decode_codes(parts, {"shape": [n], "dtype": str(dtype).removeprefix("torch.")})
    assert torch.equal(back, codes)


def test_skewed_codes_compress_below_their_bit_width():
    g = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand(100_000, generator=g) < 0.9, 0, torch.randint(1, 32, (100_000,), generator=g)).to(torch.uint8)
    nbytes = sum(t.numel() for t in encode_codes(codes).values())
    assert nbytes < 100_000 * 5 / 8 * 0.5  # far below 5 bits per code: ~0.47 + 0.5 bits of entropy


def test_kmeans_stage_saves_small_and_reloads_exactly(tmp_path, digits_mlp):
    small = ts.quantize(digits_mlp, KMeansConfig(bits=4))
    assert isinstance(small.net[1], ClusteredLayer)
    ts.save(small, tmp_path / "k")
    ts.save(digits_mlp, tmp_path / "d")
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "k") < 0.2 * size(tmp_path / "d")
    back = ts.load(tmp_path / "k")
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(back(x), small(x))


def test_bad_bits_is_a_clear_error():
    import pytest

    with pytest.raises(ConfigError, match=r"kmeans.bits=9 is outside the allowed range \[1, 8\]"):
        KMeansConfig(bits=9)
