"""INT8 dynamic on oneDNN: our C activation quantizer (vs its torch fallback), the per-row epilogue
with fused GELU, the oneDNN Linear, GELU fusion into the preceding GEMM and fused Q/K/V."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchshrink
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.quant import Int8DynamicConfig, Int8DynamicLinear, kernels
from torchshrink.quant.fused import FusedQKV, QKVPart

torch.set_num_threads(2)
needs_c = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: only the torch fallback runs")


def _x(rows: int = 64, cols: int = 96) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    x[3] *= 40  # an outlier row
    x[5] = 0.0  # a zero row
    x[7] = x[7].abs()  # a row with no negative values
    return x


def _torch_only(monkeypatch):
    monkeypatch.setattr(kernels, "_LIB", None)
    monkeypatch.setattr(kernels, "_TRIED", True)


@needs_c
@pytest.mark.parametrize("qmax", [255, 127])
def test_c_quantizer_matches_torch_fallback_and_error_bound(monkeypatch, qmax):
    x = _x()
    q, s, z = kernels.quant_rows(x, qmax)
    qt, st, zt = kernels.quant_tensor(x, qmax)
    _torch_only(monkeypatch)
    q2, s2, z2 = kernels.quant_rows(x, qmax)
    qt2, st2, zt2 = kernels.quant_tensor(x, qmax)
    assert torch.equal(q, q2) and torch.allclose(s, s2) and torch.equal(z, z2)
    assert torch.equal(qt, qt2) and st == pytest.approx(st2) and zt == zt2
    assert int(q.max()) <= qmax and int(qt.max()) <= qmax
    err = ((q.float() - z[:, None]) * s[:, None] - x).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())  # round-to-nearest on every row's own grid
    assert bool((q[5] == z[5]).all())  # zero is exact


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("c", [True, False])
def test_rows_epilogue_formula(monkeypatch, gelu, c):
    if not c:
        _torch_only(monkeypatch)
    elif kernels.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    acc, colsum, bias = torch.randn(40, 24, generator=g) * 50, torch.randn(24, generator=g), torch.randn(24, generator=g)
    s, z = torch.rand(40, generator=g) * 0.1, torch.randint(0, 255, (40,), dtype=torch.int32, generator=g)
    ref = (acc - z.float()[:, None] * colsum) * s[:, None] + bias
    ref = F.gelu(ref) if gelu else ref
    out = kernels.rows_epilogue(acc.clone(), s, z, colsum, bias, gelu=gelu)
    assert torch.allclose(out, ref, atol=2e-5 * float(ref.abs().max()), rtol=0)


def _float_lin() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 48)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (y - ref).norm(dim=-1) / ref.norm(dim=-1)


def test_onednn_per_token_7bit_is_accurate_and_zero_rows_give_bias():
    lin = _float_lin()
    x = torch.randn(3, 20, 128, generator=torch.Generator().manual_seed(2))
    x[0, 1] *= 100
    x[1, 4] = 0.0
    q = Int8DynamicLinear.from_float(lin, reduce_range=True, activation="token", kernel="onednn")
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == (3, 20, 48)
    assert torch.allclose(y[1, 4], lin.bias, atol=1e-6)
    err = _rel_err(y, ref).reshape(-1)
    assert float(err[torch.arange(60) != 24].max()) < 0.05


@pytest.mark.parametrize("act", ["tensor", "token"])
def test_onednn_matches_linear_dynamic_and_fuses_gelu(act):
    lin = _float_lin()
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(3)).abs()  # small codes: no int16 saturation
    a = Int8DynamicLinear.from_float(lin, reduce_range=True, activation=act, post_op="gelu")
    b = Int8DynamicLinear.from_float(lin, reduce_range=True, activation=act, kernel="onednn", post_op="gelu")
    with torch.no_grad():
        ya, yb, ref = a(x), b(x), F.gelu(lin(x))
    assert float(_rel_err(yb, ref).max()) < 0.05
    assert float(_rel_err(yb, ya).max()) < 0.02


def test_quantize_fuses_gelu_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 16)).eval()
    x = torch.randn(30, 64)
    q = torchshrink.quantize(m, Int8DynamicConfig(kernel="onednn", activation="token", reduce_range="on"))
    assert isinstance(q[1], nn.Identity) and q[0].post_op == "gelu" and q[2].post_op == "none"
    assert "GELU fused into 1 GEMMs" in q._torchshrink_quant_backend and "oneDNN" in q._torchshrink_quant_backend
    with torch.no_grad():
        assert float(_rel_err(q(x), m(x)).max()) < 0.05
    torchshrink.save(q, tmp_path / "q")
    back = torchshrink.load(tmp_path / "q", model=nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 16)))
    assert back[0].kernel == "onednn" and back[0].post_op == "gelu"
    assert torch.equal(back(x), q(x))
    # tanh-approximate GELU is a different function: not fused
    m2 = nn.Sequential(nn.Linear(64, 96), nn.GELU(approximate="tanh"), nn.Linear(96, 16))
    q2 = torchshrink.quantize(m2, Int8DynamicConfig(kernel="onednn"))
    assert isinstance(q2[1], nn.GELU) and q2[0].post_op == "none"


def test_kernel_auto_picks_a_real_kernel_and_bad_kernel_is_rejected():
    m = nn.Sequential(nn.Linear(64, 32)).eval()
    q = torchshrink.quantize(m, Int8DynamicConfig(kernel="auto"))
    assert q[0].kernel in ("linear_dynamic", "onednn")
    with pytest.raises(ConfigError, match="kernel"):
        Int8DynamicConfig(kernel="mkl")
    with pytest.raises(ConfigError, match="allowed: linear_dynamic, onednn"):
        Int8DynamicLinear(8, 4, kernel="mkl")


def _tiny_bert() -> tuple[nn.Module, list]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randint(0, 120, (4, 16), generator=g), torch.ones(4, 16, dtype=torch.long)) for _ in range(2)]
    return m, data


def test_fused_qkv_equals_separate_projections_and_round_trips(tmp_path):
    m, data = _tiny_bert()
    base = {"kernel": "onednn", "activation": "tensor", "reduce_range": "on"}
    sep = torchshrink.quantize(m, Int8DynamicConfig(**base), data=data)
    fused = torchshrink.quantize(m, Int8DynamicConfig(**base, fuse_qkv=True), data=data)
    attn = fused.encoder.layer[0].attention.self
    assert isinstance(attn.query, FusedQKV) and isinstance(attn.key, QKVPart) and isinstance(attn.value, QKVPart)
    assert attn.query.linear.out_features == 3 * 64
    ids, am = data[0]
    with torch.no_grad():
        a, b = sep(ids, am).last_hidden_state, fused(ids, am).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)  # same grid per input, same per-channel weights
    torchshrink.save(fused, tmp_path / "f")
    back = torchshrink.load(tmp_path / "f", model=_tiny_bert()[0])
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)
    with pytest.raises(UnsupportedLayerError, match="without its query call"):
        attn.key(torch.randn(2, 64))


def test_fused_qkv_needs_data_to_check_the_call_order():
    m, _ = _tiny_bert()
    q = torchshrink.quantize(m, Int8DynamicConfig(kernel="onednn", fuse_qkv=True))
    attn = q.encoder.layer[0].attention.self
    assert isinstance(attn.query, Int8DynamicLinear) and isinstance(attn.key, Int8DynamicLinear)


def test_export_twin_keeps_a_fused_gelu():
    """The ONNX twin of a oneDNN layer with its GELU fused in the epilogue emits the GELU after the GEMM."""
    from torchshrink.export.onnx import export_twin

    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    m = Int8DynamicLinear.from_float(lin, kernel="onednn", post_op="gelu")
    x = torch.randn(4, 16)
    twin = export_twin(nn.Sequential(m))
    assert isinstance(twin[0], nn.Sequential) and isinstance(twin[0][1], nn.GELU)
    ref = F.gelu(lin(x))
    assert (twin(x) - ref).abs().max() < 0.05 and (twin(x) - ref).abs().max() < (F.relu(lin(x)) - ref).abs().max()
