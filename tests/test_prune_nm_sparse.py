import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchshrink as ts
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.export.formats import decode_tensor, encode_tensor
from torchshrink.measure import count_macs, count_nonzero, count_params
from torchshrink.prune import NMConfig, SparseLinear, UnstructuredConfig, use_sparse_kernels
from torchshrink.prune.importance import nm_mask
from torchshrink.prune.sensitivity import plot_sensitivity, sensitivity, sensitivity_markdown

torch.set_num_threads(2)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), extra=st.integers(0, 8), groups=st.integers(1, 6), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_nm_mask_keeps_exactly_n_per_group(n, extra, groups, rows, seed):
    m = n + extra
    w = torch.randn(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = nm_mask(w.abs(), n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()
    kept_min = w.abs().masked_fill(~mask, float("inf")).reshape(rows, groups, m).min(-1).values
    dropped_max = w.abs().masked_fill(mask, -1.0).reshape(rows, groups, m).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_2_4_on_model_groups_along_input_dim(tiny):
    out = ts.prune(tiny, NMConfig(n=2, m=4))
    w = out.fc1.weight  # [32, 128]
    assert (torch.count_nonzero(w.reshape(32, 32, 4), dim=-1) == 2).all()
    cw = out.conv.weight  # [8, 3, 3, 3]: input 3 is not a multiple of 4 -> left dense
    assert torch.equal(cw, tiny.conv.weight)
    conv = nn.Sequential(nn.Conv2d(8, 4, 3))
    c = ts.prune(conv, NMConfig(n=1, m=4))[0].weight  # [4, 8, 3, 3], groups along in-channels
    assert (torch.count_nonzero(c.movedim(1, -1).reshape(4, 3, 3, 2, 4), dim=-1) == 1).all()


def test_nm_errors(tiny):
    with pytest.raises(ConfigError, match="n=4 > m=2.*1 <= n <= m"):
        NMConfig(n=4, m=2)
    with pytest.raises(UnsupportedLayerError, match="multiple of m=4.*conv \\(inputs 3\\)"):
        ts.prune(tiny, NMConfig(), select={"include": ["conv"]})


def test_nm_survives_finetune_and_4_8(tiny):
    out = ts.prune(tiny, NMConfig(n=4, m=8))
    assert (torch.count_nonzero(out.fc1.weight.reshape(32, 16, 8), dim=-1) == 4).all()


def test_saved_file_tracks_nonzeros_and_reloads_bit_for_bit(tmp_path):
    from torchshrink.export.io import saved_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    dense_bytes = saved_bytes(net)
    out = ts.prune(net, UnstructuredConfig(sparsity=0.9, scope="global", min_density=0.05))
    assert saved_bytes(out) <= 0.15 * dense_bytes
    ts.save(out, tmp_path / "m")
    back = ts.load(tmp_path / "m", model=nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)))
    for k, v in out.state_dict().items():
        assert torch.equal(v.view(torch.int32), back.state_dict()[k].view(torch.int32)), k


def test_sparse_linear_matches_dense_and_round_trips(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.8)
    sp = SparseLinear.from_linear(lin)
    for backend in ("c", "torch"):
        sp.backend = backend
        for x in (torch.randn(1, 96), torch.randn(7, 96), torch.randn(2, 3, 96)):
            torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    assert count_params(sp) == count_params(lin)
    assert count_nonzero(sp) == int(torch.count_nonzero(lin.weight)) + 40
    assert count_macs(nn.Sequential(sp), (torch.randn(3, 96),)) == 3 * int(torch.count_nonzero(lin.weight))
    net = nn.Sequential(sp)
    ts.save(net, tmp_path / "s")
    back = ts.load(tmp_path / "s", model=nn.Sequential(nn.Linear(96, 40)))
    assert isinstance(back[0], SparseLinear)
    assert torch.equal(back[0].dense_weight(), lin.weight.detach()) and torch.equal(back[0].bias, lin.bias)
    plain = nn.Linear(96, 40)
    plain.load_state_dict(sp.state_dict())  # loads into a dense Linear too
    assert torch.equal(plain.weight, lin.weight)


def test_use_sparse_kernels_decides_by_measurement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 8))
    with torch.no_grad():
        net[0].weight.mul_(torch.rand_like(net[0].weight) > 0.9)
    rep = use_sparse_kernels(nn.Sequential(*net), min_numel=1000, min_speedup=1e9, runs=3)
    assert set(rep) == {"0"} and rep["0"]["used"] is False  # net[1]: too few weights, never timed
    x = torch.randn(1, 128)
    ref = net(x)
    rep = use_sparse_kernels(net, min_numel=1000, min_speedup=0.0, runs=3)
    assert rep["0"]["used"] and isinstance(net[0], SparseLinear) and type(net[1]) is nn.Linear
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    assert ts.report(net)[-1].notes["sparse_kernels"] is rep


def test_csr_format_round_trip():
    t = torch.randn(33, 70) * (torch.rand(33, 70) > 0.85)
    t[3] = 0
    for x in (t, t.reshape(33, 7, 10), torch.tensor([0.0, -0.0, 2.5] * 30)):
        fmt, parts = encode_tensor(x, "csr")
        assert fmt == "csr" and parts["col"].dtype == torch.int16
        assert torch.equal(decode_tensor(fmt, parts, {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}), x)


def test_sensitivity_table_and_plot(tiny, tmp_path):
    data = [torch.randn(8, 3, 4, 4)]
    ref = tiny(data[0]).detach()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    rows = sensitivity(tiny, data, sparsities=(0.0, 0.5, 0.99),
                       evaluate=lambda m: float(torch.nn.functional.cosine_similarity(m(data[0]), ref).mean().detach()))
    assert rows[0] == {"layer": "(none)", "sparsity": 0.0, "metric": pytest.approx(1.0), "drop": 0.0}
    by = {(r["layer"], r["sparsity"]): r["metric"] for r in rows}
    assert by[("fc1", 0.0)] == pytest.approx(1.0) and by[("fc1", 0.99)] < by[("fc1", 0.5)] < 1.0
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    md = sensitivity_markdown(rows)
    assert "| fc2 |" in md and "99%" in md
    png = plot_sensitivity(rows, tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="sparsity"):
        sensitivity(tiny, data, sparsities=(1.0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_zlib_is_lossless_and_only_for_sparse(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 50, generator=g).masked_fill(torch.rand(64, 50, generator=g) < 0.9, 0.0).to(dtype)
    t[0, :3] = torch.tensor([-0.0, float("inf"), float("nan")]).to(dtype)
    fmt, parts = encode_tensor(t)
    assert fmt == "bitmask-zlib" and int(parts["z"][0]) == 1
    back = decode_tensor(fmt, parts, {"shape": [64, 50], "dtype": str(dtype).removeprefix("torch.")})
    assert torch.equal(back.view(torch.uint8 if dtype != torch.float32 else torch.int32),
                       t.view(torch.uint8 if dtype != torch.float32 else torch.int32))
    dense = torch.randn(64, 50, generator=g)
    assert encode_tensor(dense)[0] == "dense"  # dense tensors are never entropy-coded


def test_the_whole_model_keeps_dense_layers_where_csr_made_it_slower():
    """Layers are swapped to CSR one by one when each times faster alone; the runner times the whole model
    and keeps the dense twin (same weights, same file) when that is faster."""
    from types import SimpleNamespace

    import torchshrink.recipe.advice as R
    from torchshrink.export.io import saved_bytes
    from torchshrink.prune.sparse import dense_twin

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        net[0].weight[net[0].weight.abs() < 0.1] = 0.0
    sparse = copy.deepcopy(net)
    sparse[0] = SparseLinear.from_linear(net[0])
    twin = dense_twin(sparse)
    x = torch.randn(3, 64)
    assert type(twin[0]) is nn.Linear and torch.allclose(twin(x), sparse(x), atol=1e-5)
    assert abs(saved_bytes(twin) - saved_bytes(sparse)) <= 0.01 * saved_bytes(sparse)  # same bitmask weights
    assert dense_twin(net) is None
    ms = lambda v: SimpleNamespace(p50_ms=v)  # noqa: E731
    kept, lat, why = R.faster_variant(sparse, ms(1.0), ms(1.5), lambda a, b: (ms(2.0), ms(1.0)), "1/2 unstructured")
    assert type(kept[0]) is nn.Linear and lat.p50_ms == 1.0 and "kept dense" in why
    same, _, why = R.faster_variant(sparse, ms(1.0), ms(1.02), None, "1/2 unstructured")  # not slower: untouched
    assert same is sparse and why == ""
