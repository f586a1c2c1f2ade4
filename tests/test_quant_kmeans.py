import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchshrink as ts
from torchshrink.core import state
from torchshrink.core.errors import ConfigError
from torchshrink.quant.entropy import decode_codes, encode_codes
from torchshrink.quant.kmeans import ClusteredLayer, KMeansConfig, kmeans_1d


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

    with pytest.raises(ConfigError, match=r"kmeans.bits=9 is outside the allowed range \[1, 8\]"):
        KMeansConfig(bits=9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 70), st.floats(0.0, 1.0), st.sampled_from([torch.uint8, torch.int16]))
def test_relative_index_round_trip_is_exact_with_long_gaps(rows, cols, density, dtype):
    from torchshrink.quant.entropy import decode_relidx, encode_relidx

    g = torch.Generator().manual_seed(rows * 100 + cols)
    codes = torch.randint(1, 16, (rows, cols * 5), generator=g).to(dtype)
    codes[torch.rand(rows, cols * 5, generator=g) > density * 0.05] = 0  # gaps far beyond 255
    parts = encode_relidx(codes)
    assert parts["gaps"].dtype == torch.uint8
    back = decode_relidx(parts, {"shape": list(codes.shape), "dtype": str(dtype).removeprefix("torch.")})
    assert torch.equal(back, codes)


def test_relative_index_pads_gaps_over_255_like_the_paper():
    import numpy as np

    from torchshrink.quant.entropy import from_relative_index, relative_index

    flat = np.zeros(1000, dtype=np.uint8)
    flat[[3, 600, 999]] = [5, 6, 7]
    gaps, vals = relative_index(flat)
    # 3 | 596 = 2 pads of 256 + 84 | 398 = 1 pad + 142
    assert gaps.tolist() == [3, 255, 255, 84, 255, 142]
    assert vals.tolist() == [5, 0, 0, 6, 0, 7]
    assert np.array_equal(from_relative_index(gaps, vals, 1000), flat)


def test_batchnorm_is_folded_into_the_clustered_conv(digits_cnn):
    small = ts.quantize(digits_cnn, KMeansConfig(bits=8))
    assert isinstance(small.features[1], torch.nn.Identity)
    assert isinstance(small.features[0], ClusteredLayer) and small.features[0].bias is not None
    x = torch.randn(16, 1, 8, 8)
    ref = digits_cnn(x)
    # 8-bit shared weights of the folded conv: outputs stay close to the BN model's
    assert (small(x) - ref).abs().max() < 0.05 * ref.abs().max()
    kept = ts.quantize(digits_cnn, KMeansConfig(bits=8, fold_bn=False))
    assert isinstance(kept.features[1], torch.nn.BatchNorm2d)


def test_deep_compressed_model_uses_the_compact_container_and_reloads_exactly(tmp_path, digits_mlp):
    from torchshrink.export.io import saved_bytes
    from torchshrink.quant.kmeans import finalize_kmeans

    cfg = KMeansConfig(bits=4)
    sparse = ts.load_model("zoo:digits-mlp")
    with torch.no_grad():
        for p in sparse.parameters():
            if p.dim() == 2:
                p[p.abs() < p.abs().flatten().kthvalue(int(0.92 * p.numel())).values] = 0
    small = finalize_kmeans(ts.quantize(sparse, cfg), cfg)
    ts.save(small, tmp_path / "k")
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["manifest.json", "model.tsz"]
    assert saved_bytes(small) == sum(p.stat().st_size for p in (tmp_path / "k").iterdir())
    assert saved_bytes(digits_mlp) / saved_bytes(small) > 25  # 8% density, 4-bit codes, fp16 biases
    back = ts.load(tmp_path / "k")
    assert state.get(back.net[1], "formats")["codes"] == "relidx"
    x = torch.randn(7, 1, 8, 8)
    assert torch.equal(back(x), small(x))
    assert torch.equal(ts.load_model(str(tmp_path / "k"))(x), small(x))  # a folder spec finds it too


def test_corrupt_container_is_a_clear_error(tmp_path, digits_mlp):

    from torchshrink.core.errors import ModelLoadError

    ts.save(ts.quantize(digits_mlp, KMeansConfig(bits=3)), tmp_path / "k")
    blob = (tmp_path / "k" / "model.tsz").read_bytes()
    (tmp_path / "k" / "model.tsz").write_bytes(blob[:40])
    with pytest.raises(ModelLoadError, match="model.tsz is (corrupt|truncated)"):
        ts.load(tmp_path / "k")
    (tmp_path / "k" / "model.tsz").write_bytes(b"PK\x03\x04" + blob[4:])
    with pytest.raises(ModelLoadError, match="not a torchshrink container"):
        ts.load(tmp_path / "k")


def test_dead_units_lose_their_incoming_weights_and_outputs_stay_identical():
    from torchshrink.quant.dead_units import zero_dead_units

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight[net[0].weight.abs() < 0.05] = 0
        net[2].weight[:, [1, 4, 7]] = 0  # hidden units 1, 4, 7 feed nothing
        net[4].weight[:, 2] = 0  # second hidden unit 2 feeds nothing
    small = ts.quantize(net, KMeansConfig(bits=3, half_params=False, drop_dead=False))
    x = torch.randn(32, 12)
    with torch.inference_mode():
        ref = small(x)
    assert zero_dead_units(small) == 4
    assert torch.equal(small[0].codes[[1, 4, 7]], torch.zeros(3, 12, dtype=torch.uint8))
    assert small[0].bias[[1, 4, 7]].abs().sum() == 0 and small[2].bias[2] == 0
    assert int((small[0].codes[0] != 0).sum()) > 0  # live units untouched
    with torch.inference_mode():
        assert torch.equal(small(x), ref)


def test_models_saved_with_the_older_entropy_format_still_load(tmp_path, digits_mlp):
    small = ts.quantize(digits_mlp, KMeansConfig(bits=4))
    for m in small.modules():
        if isinstance(m, ClusteredLayer):
            state.put(m, formats={"codes": "entropy"})  # what files written before relidx hold
    ts.save(small, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["manifest.json", "model.safetensors"]
    back = ts.load(tmp_path / "old")
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(back(x), small(x))


def test_files_naming_the_old_cluster_package_still_load(tmp_path):
    """k-means moved from torchshrink/cluster to torchshrink/quant; manifests written before name the old path."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    out = ts.quantize(net, KMeansConfig(bits=3))
    ts.save(out, tmp_path / "m")
    from torchshrink.export.container import read_container, write_container

    box = tmp_path / "m" / "model.tsz"
    manifest, flat = read_container(box)
    types = {rec["type"] for rec in manifest["modules"]}
    assert "torchshrink.quant.kmeans.ClusteredLayer" in types
    for rec in manifest["modules"]:
        rec["type"] = rec["type"].replace("torchshrink.quant.kmeans.", "torchshrink.cluster.kmeans.")
    write_container(box, flat, manifest)
    back = ts.load(tmp_path / "m")
    x = torch.randn(3, 16)
    assert torch.equal(back(x), out(x))
