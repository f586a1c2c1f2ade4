import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torchshrink.core.errors import ConfigError, DataError
from torchshrink.distill import losses as L


def _manual_kd(s, t, y, T, alpha):
    ps = torch.softmax(s / T, -1)
    pt = torch.softmax(t / T, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -torch.log_softmax(s, -1)[torch.arange(len(y)), y].mean()
    return (1 - alpha) * ce + alpha * T * T * kl


def test_kd_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    for T, a in [(1.0, 0.5), (4.0, 0.7), (2.5, 0.0), (3.0, 1.0)]:
        got = L.kd_loss(s, t, y, temperature=T, alpha=a)
        assert torch.allclose(got, _manual_kd(s, t, y, T, a), atol=1e-5), (T, a)


def test_kd_loss_alpha_zero_is_cross_entropy_and_soft_term_zero_on_equal_logits():
    s = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    assert torch.allclose(L.kd_loss(s, torch.randn(4, 10), y, alpha=0.0), F.cross_entropy(s, y))
    assert float(L.kd_loss(s, s.clone(), None, temperature=3.0)) == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 20.0), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_kd_loss_is_non_negative(T, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(3, 5, generator=g) * 5, torch.randn(3, 5, generator=g) * 5
    y = torch.randint(0, 5, (3,), generator=g)
    assert float(L.kd_loss(s, t, y, temperature=T, alpha=alpha)) >= -1e-6


@pytest.mark.parametrize(("T", "alpha", "match"), [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"),
                                                 (math.nan, 0.5, "temperature"), (2.0, 1.5, "alpha"),
                                                 (2.0, -0.1, "alpha")])
def test_bad_temperature_or_alpha_is_a_config_error(T, alpha, match):
    with pytest.raises(ConfigError, match=match):
        L.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=T, alpha=alpha)


def test_mismatched_logits_are_a_data_error_naming_both_shapes():
    with pytest.raises(DataError, match=r"\(2, 10\).*\(2, 100\)"):
        L.kd_loss(torch.zeros(2, 10), torch.zeros(2, 100))
    with pytest.raises(DataError):
        L.logit_mse(torch.zeros(2, 10), torch.zeros(3, 10))


def test_logit_mse_and_output_match():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(L.logit_mse(a, b), ((a - b) ** 2).mean())
    assert float(L.output_match(a, a.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(L.output_match(a, -a)) == pytest.approx(2.0 + float((4 * a * a).mean()), rel=1e-5)


def test_hint_adapter_maps_widths_and_learns():
    s = torch.randn(2, 4, 5, 5)
    t = torch.randn(2, 8, 5, 5)
    ad = L.make_adapter(s.shape, t.shape)
    assert isinstance(ad.proj, torch.nn.Conv2d) and ad(s).shape == t.shape
    loss = L.hint_loss(s, t, ad)
    loss.backward()
    assert ad.proj.weight.grad is not None and ad.proj.weight.grad.abs().sum() > 0
    lin = L.make_adapter(torch.Size([2, 7, 16]), torch.Size([2, 7, 32]))
    assert isinstance(lin.proj, torch.nn.Linear) and lin.proj.weight.shape == (32, 16)
    assert L.make_adapter(t.shape, t.shape) is None


def test_hint_shapes_that_cannot_be_matched_are_errors():
    with pytest.raises(DataError, match="rank"):
        L.make_adapter(torch.Size([2, 8]), torch.Size([2, 8, 3, 3]))
    with pytest.raises(DataError, match="only the width may differ"):
        L.make_adapter(torch.Size([2, 5, 16]), torch.Size([2, 7, 32]))
    with pytest.raises(DataError, match="cannot be matched"):
        L.hint_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3))  # widths differ, no adapter


def test_hint_pools_spatial_sizes():
    t = torch.randn(2, 4, 4, 4)
    s = t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 8x8 upsampled copy
    assert float(L.hint_loss(s, t)) == pytest.approx(0.0, abs=1e-6)


def test_attention_transfer_ignores_channel_count_and_sees_spatial_differences():
    s = torch.randn(3, 4, 6, 6)
    t = torch.cat([s, s], dim=1)  # same attention map, twice the channels
    assert float(L.attention_transfer(s, t)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(3, 8, 6, 6)
    assert float(L.attention_transfer(s, other)) > 0.01
    with pytest.raises(DataError, match=r"\[B, C, H, W\]"):
        L.attention_transfer(torch.randn(3, 4), torch.randn(3, 4))


def test_hidden_cosine_respects_the_mask():
    t = torch.randn(2, 5, 8)
    s = t.clone()
    s[:, 3:] = -t[:, 3:]  # only padded positions differ
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert float(L.hidden_cosine(s, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.hidden_cosine(s, t)) == pytest.approx(2 * 2 / 5, rel=1e-4)
