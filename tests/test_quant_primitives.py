import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.core.errors import ConfigError
from torchshrink.quant.observers import OBSERVERS, make_observer
from torchshrink.quant.packing import pack_int4, unpack_int4
from torchshrink.quant.primitives import (
    compute_qparams,
    dequantize,
    dequantize_weight,
    fake_quantize,
    qrange,
    quantize,
    quantize_weight,
)

torch.set_num_threads(1)
floats = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=2, max_size=64)


@settings(max_examples=150, deadline=None)
@given(floats, st.integers(2, 8), st.booleans(), st.booleans())
def test_roundtrip_error_at_most_half_step(values, bits, signed, symmetric):
    x = torch.tensor(values)
    s, z = compute_qparams(x, bits=bits, signed=signed, symmetric=symmetric)
    q = quantize(x, s, z, bits=bits, signed=signed)
    qmin, qmax = qrange(bits, signed)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, s, z) - x).abs().max()
    assert float(err) <= float(s) / 2 + 1e-5 * float(x.abs().max()) + 1e-6


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.sampled_from([16, 32, 64]), st.integers(2, 8))
def test_per_group_and_per_channel_weights(rows, group, bits):
    torch.manual_seed(rows)
    w = torch.randn(rows, group * 2) * torch.rand(rows, 1) * 10
    for gran in ("channel", "group"):
        q, s, z = quantize_weight(w, bits=bits, granularity=gran, group_size=group)
        assert q.shape == w.shape and q.dtype == torch.int8
        assert s.shape == ((rows,) if gran == "channel" else (rows, 2))
        back = dequantize_weight(q, s, z, group if gran == "group" else None)
        step = s.max() if gran == "channel" else s.max()
        assert float((back - w).abs().max()) <= float(step) / 2 + 1e-5


def test_asymmetric_uses_formula_and_zero_is_exact():
    x = torch.tensor([-1.0, 0.0, 3.0])
    s, z = compute_qparams(x, bits=8, signed=False, symmetric=False)
    assert float(s) == pytest.approx(4.0 / 255)
    assert float(dequantize(quantize(torch.tensor(0.0), s, z, signed=False), s, z)) == 0.0


def test_fake_quantize_has_straight_through_gradient():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    s, z = compute_qparams(x.detach(), bits=4)
    y = fake_quantize(x, s, z, bits=4)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(11))
    assert len(torch.unique(y.detach())) <= 16


def test_unsupported_bits_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed: 2, 3, 4, 5, 6, 7, 8"):
        qrange(9, True)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(-8, 7), min_size=1, max_size=40).map(lambda v: v + v[:1] if len(v) % 2 else v))
def test_int4_packing_round_trip(codes):
    q = torch.tensor(codes, dtype=torch.int8).reshape(1, -1)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == q.shape[-1] // 2
    assert torch.equal(unpack_int4(packed), q)


def test_int4_packing_rejects_out_of_range():
    with pytest.raises(ConfigError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[9, 0]]))


def test_observers_clip_outliers_where_expected():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[0] = 60.0
    ranges = {}
    for name in OBSERVERS:
        o = make_observer(name)
        o.update(x)
        ranges[name] = o.range()
    assert ranges["minmax"][1] == pytest.approx(60.0)
    assert ranges["percentile"][1] < 5.0
    assert ranges["entropy"][1] < 10.0
    with pytest.raises(Exception, match="saw no data"):
        make_observer("mse").range()
    with pytest.raises(ConfigError, match="allowed"):
        make_observer("bogus")
