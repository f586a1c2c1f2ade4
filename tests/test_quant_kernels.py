"""INT8 dynamic on oneDNN: our C activation quantizer (vs its torch fallback), the per-row epilogue
with fused GELU, the oneDNN Linear, GELU fusion into the preceding GEMM and fused Q/K/V."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchshrink
from tests.conftest import tiny_bert
from torchshrink.core import native
from torchshrink.core.errors import ConfigError, UnsupportedLayerError
from torchshrink.quant import Int8DynamicConfig, Int8DynamicLinear, kernels
from torchshrink.quant.fused import FusedQKV, QKVPart

torch.set_num_threads(2)
needs_c = pytest.mark.skipif(not kernels.available(), reason="no C compiler: only the torch fallback runs")


def _x(rows: int = 64, cols: int = 96) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    x[3] *= 40  # an outlier row
    x[5] = 0.0  # a zero row
    x[7] = x[7].abs()  # a row with no negative values
    return x


def _torch_only(monkeypatch):
    monkeypatch.setenv("TORCHSHRINK_KERNELS", "torch")


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


def _epilogue_case(seed: int, zmax: int) -> tuple[torch.Tensor, ...]:
    """A raw GEMM accumulator [40, 24], colsum, bias, row scales and row zero points in [0, zmax)."""
    g = torch.Generator().manual_seed(seed)
    acc, colsum, bias = torch.randn(40, 24, generator=g) * 50, torch.randn(24, generator=g), torch.randn(24, generator=g)
    s, z = torch.rand(40, generator=g) * 0.1, torch.randint(0, zmax, (40,), dtype=torch.int32, generator=g)
    return acc, colsum, bias, s, z


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("c", [True, False])
def test_rows_epilogue_formula(monkeypatch, gelu, c):
    if not c:
        _torch_only(monkeypatch)
    elif not kernels.available():
        pytest.skip("no C compiler")
    acc, colsum, bias, s, z = _epilogue_case(1, 255)
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
    assert "GELU fused into 1 GEMMs" in torchshrink.report(q)[-1].notes["backend"] and "oneDNN" in torchshrink.report(q)[-1].notes["backend"]
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


def test_fused_qkv_equals_separate_projections_and_round_trips(tmp_path):
    m, data = tiny_bert()
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
    back = torchshrink.load(tmp_path / "f", model=tiny_bert()[0])
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)
    with pytest.raises(UnsupportedLayerError, match="without its query call"):
        attn.key(torch.randn(2, 64))


def test_fused_qkv_needs_data_to_check_the_call_order():
    m, _ = tiny_bert()
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


@pytest.mark.parametrize("mode", ["grid", "bias", "plain"])
@pytest.mark.parametrize("c", [True, False])
def test_add_layernorm_formula(monkeypatch, mode, c):
    if not c:
        _torch_only(monkeypatch)
    elif not kernels.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(2)
    acc, res = torch.randn(30, 48, generator=g) * 20, torch.randn(30, 48, generator=g) * 3
    colsum, lb = torch.randn(48, generator=g), torch.randn(48, generator=g)
    w, b = torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g)
    s, z = torch.rand(30, generator=g) * 0.1, torch.randint(0, 127, (30,), dtype=torch.int32, generator=g)
    grid = (s, z, colsum) if mode == "grid" else None
    v = (acc - z.float()[:, None] * colsum) * s[:, None] + lb if mode == "grid" else acc + lb if mode == "bias" else acc
    ref = F.layer_norm(v + res, (48,), w, b, 1e-12)
    out = kernels.add_layernorm(acc.clone(), res, w, b, 1e-12, grid, None if mode == "plain" else lb)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("act", ["tensor", "token"])
def test_fused_add_norm_equals_unfused_round_trips_and_exports(tmp_path, act):
    from torchshrink.export.onnx import export_twin
    from torchshrink.quant.fused import LinearAddNorm

    m, data = tiny_bert()
    base = {"kernel": "onednn", "activation": act, "reduce_range": "on", "fuse_qkv": True}
    sep = torchshrink.quantize(m, Int8DynamicConfig(**base), data=data)
    fused = torchshrink.quantize(m, Int8DynamicConfig(**base, fuse_add_norm=True), data=data)
    names = sorted(n for n, x in fused.named_modules() if isinstance(x, LinearAddNorm))
    assert names == sorted(f"encoder.layer.{i}.{p}" for i in range(2) for p in ("attention.output", "output"))
    assert "residual add + LayerNorm fused after 4 GEMMs" in torchshrink.report(fused)[-1].notes["backend"]
    assert isinstance(m.encoder.layer[0].output.LayerNorm, nn.LayerNorm)  # the float input is untouched
    ids, am = data[1]
    with torch.no_grad():
        a, b = sep(ids, am).last_hidden_state, fused(ids, am).last_hidden_state
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())
    torchshrink.save(fused, tmp_path / "f")
    back = torchshrink.load(tmp_path / "f", model=tiny_bert()[0])
    assert isinstance(back.encoder.layer[1].output, LinearAddNorm)
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)
    plain = {"kernel": "onednn", "activation": act}  # ONNX export has no fused Q/K/V
    twins = [export_twin(torchshrink.quantize(m, Int8DynamicConfig(**plain, fuse_add_norm=f), data=data)) for f in (False, True)]
    assert any(type(x).__name__ == "_ExportAddNorm" for x in twins[1].modules())
    with torch.no_grad():  # the fused block exports as LayerNorm(dense twin(x) + residual): the same graph values
        t0, t1 = (t(ids, am).last_hidden_state for t in twins)
    assert torch.allclose(t0, t1, atol=1e-5)


class _PreNorm(nn.Module):
    """dense / LayerNorm / dropout children, but LayerNorm before dense: must not be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = nn.Linear(16, 16), nn.LayerNorm(16), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.dense(self.LayerNorm(x)) + r


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.pre = _PreNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.pre(h, h)


def test_fused_add_norm_leaves_other_blocks_and_needs_data(caplog):
    from torchshrink.quant.fused import LinearAddNorm

    torch.manual_seed(0)
    m = _TwoBlocks().eval()
    x = torch.randn(5, 8)
    with caplog.at_level("INFO", logger="torchshrink.quant.fused"):
        q = torchshrink.quantize(m, Int8DynamicConfig(kernel="onednn", fuse_add_norm=True), data=[x])
    assert not isinstance(q.pre, LinearAddNorm)
    assert "does not compute LayerNorm(dense(x) + residual)" in caplog.text
    with torch.no_grad():
        assert (q(x) - m(x)).abs().max() < 0.1  # still the pre-norm block, on its int8 dense
    bert, _ = tiny_bert()
    q2 = torchshrink.quantize(bert, Int8DynamicConfig(kernel="onednn", fuse_add_norm=True))
    assert not any(isinstance(x, LinearAddNorm) for x in q2.modules())


@pytest.mark.skipif(native.library() is None, reason="no native library: codes are handed over by its epilogues")
def test_next_quant_hand_over_is_exact_skips_requantization_and_round_trips(tmp_path, monkeypatch):
    m, data = tiny_bert()
    base = {"kernel": "onednn", "activation": "token", "reduce_range": "on", "fuse_add_norm": True}
    plain = torchshrink.quantize(m, Int8DynamicConfig(**base), data=data)
    linked = torchshrink.quantize(m, Int8DynamicConfig(**base, fuse_next_quant=True), data=data)
    emitters = sorted(n for n, x in linked.named_modules() if getattr(x, "emit_codes", 0))
    assert emitters == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert all(x.emit_codes == 127 for n, x in linked.named_modules() if n in emitters)
    assert "codes written by 2 epilogues" in torchshrink.report(linked)[-1].notes["backend"]
    calls = []
    real = kernels.quant_rows
    monkeypatch.setattr(kernels, "quant_rows", lambda x, q=255: calls.append(x.shape) or real(x, q))
    ids, am = data[1]
    with torch.no_grad():
        a = plain(ids, am).last_hidden_state
        n_plain = len(calls)
        b = linked(ids, am).last_hidden_state
    assert torch.equal(a, b)  # the handed-over codes are the ones the consumer would compute
    assert n_plain - (len(calls) - n_plain) == 2  # two FFN-output layers no longer quantize their input
    torchshrink.save(linked, tmp_path / "l")
    back = torchshrink.load(tmp_path / "l", model=tiny_bert()[0])
    assert back.encoder.layer[0].intermediate.dense.emit_codes == 127
    with torch.no_grad():
        assert torch.equal(back(ids, am).last_hidden_state, b)


def test_handed_over_codes_are_not_used_for_a_modified_tensor():
    torch.manual_seed(0)
    first = Int8DynamicLinear.from_float(nn.Linear(16, 32), kernel="onednn", activation="token", post_op="gelu")
    first.emit_codes = 127
    second = Int8DynamicLinear.from_float(nn.Linear(32, 8), kernel="onednn", activation="token", reduce_range=True)
    x = torch.randn(6, 16)
    with torch.no_grad():
        y = first(x)
        y.mul_(3.0)  # in place: the parked codes are stale now
        got = second(y)
        assert torch.equal(got, second(y.clone()))
    with pytest.raises(ConfigError, match="emit_codes=3; allowed: 0"):
        Int8DynamicLinear(4, 4, emit_codes=3)


def test_bert_int8_recipe_applies_every_fusion():
    from torchshrink.recipe.recipe import load_recipe

    m, data = tiny_bert()
    (stage,) = load_recipe("bert-int8").stages
    q = torchshrink.quantize(m, stage.config, select=stage.select, data=data)
    line = torchshrink.report(q)[-1].notes["backend"]
    assert "8 layers" in line and "per-tensor + per-token" in line
    for part in ("GELU fused into 2 GEMMs", "LayerNorm fused after 4 GEMMs", "codes written by 2 epilogues"):
        assert part in line
    assert isinstance(q.encoder.layer[1].attention.self.query, FusedQKV)
    assert q.encoder.layer[0].intermediate.dense.activation == "token"
    ids, am = data[0]
    with torch.no_grad():
        ref, got = m(ids, am).last_hidden_state, q(ids, am).last_hidden_state
    assert float(F.cosine_similarity(ref.flatten(1), got.flatten(1)).min()) > 0.99


class _InplaceBetween(nn.Module):
    """A per-token layer's output modified in place before the next per-token layer reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y.mul_(2.0)
        return self.b(y)


def test_next_quant_is_not_linked_across_an_in_place_change_and_works_in_inference_mode():
    torch.manual_seed(0)
    cfg = Int8DynamicConfig(kernel="onednn", activation="token", reduce_range="on", fuse_next_quant=True)
    x = torch.randn(6, 16)
    q = torchshrink.quantize(_InplaceBetween().eval(), cfg, data=[x])
    assert q.a.emit_codes == 0  # the bit-identical check (inference mode: no version counters) unlinked it
    m, data = tiny_bert()
    linked = torchshrink.quantize(m, Int8DynamicConfig(kernel="onednn", activation="token", reduce_range="on",
                                                      fuse_next_quant=True), data=data)
    plain = torchshrink.quantize(m, Int8DynamicConfig(kernel="onednn", activation="token", reduce_range="on"), data=data)
    assert linked.encoder.layer[0].intermediate.dense.emit_codes == 127
    with torch.inference_mode():
        assert torch.equal(linked(*data[1]).last_hidden_state, plain(*data[1]).last_hidden_state)


def test_fused_add_norm_on_the_linear_dynamic_kernel():
    from torchshrink.quant.fused import LinearAddNorm

    m, data = tiny_bert()
    sep = torchshrink.quantize(m, Int8DynamicConfig(kernel="linear_dynamic"), data=data)
    fused = torchshrink.quantize(m, Int8DynamicConfig(kernel="linear_dynamic", fuse_add_norm=True), data=data)
    assert isinstance(fused.encoder.layer[0].output, LinearAddNorm)
    with torch.no_grad():
        a, b = sep(*data[1]).last_hidden_state, fused(*data[1]).last_hidden_state
    assert float((a - b).abs().max()) < 1e-4 * float(a.abs().max())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("c", [True, False])
def test_rows_epilogue_codes_equal_quantizing_the_epilogue_output(monkeypatch, gelu, c):
    if not c:
        _torch_only(monkeypatch)
    elif not kernels.available():
        pytest.skip("no C compiler")
    acc, colsum, bias, s, z = _epilogue_case(3, 127)
    y_ref = kernels.rows_epilogue(acc.clone(), s, z, colsum, bias, gelu=gelu)
    y, (q, qs, qz) = kernels.rows_epilogue_codes(acc.clone(), s, z, colsum, bias, gelu, 127)
    q2, qs2, qz2 = kernels.quant_rows(y.contiguous(), 127)
    assert torch.allclose(y, y_ref, atol=1e-5 * float(y_ref.abs().max()), rtol=0)
    assert torch.equal(q, q2) and torch.equal(qs, qs2) and torch.equal(qz, qz2)  # exactly what the consumer computes
