import torch

from torchshrink.binary import ste

torch.set_num_threads(1)


def test_sign_ste_clipped_identity_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.5], requires_grad=True)
    y = ste.sign_ste(x, clip=1.0)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_approx_sign_gradient_is_two_minus_two_abs():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0], requires_grad=True)
    ste.approx_sign(x).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 2.0, 1.5, 0.0]))


def test_magnitude_aware_sign_scales_and_passes_gradient_through_mean():
    w = torch.tensor([[0.2, -0.4], [1.0, 3.0]], requires_grad=True)
    q = ste.magnitude_aware_sign(w, clip=10.0)
    assert torch.allclose(q, torch.tensor([[0.3, -0.3], [2.0, 2.0]]))
    q.sum().backward()
    # d/dw of mean|w|*sign(w) summed: sign grad (1 each) * alpha + d alpha/dw * sum(sign(w))
    assert torch.allclose(w.grad, torch.tensor([[0.3, 0.3], [3.0, 3.0]]))


def test_twn_threshold_and_scale():
    w = torch.tensor([0.1, -0.9, 0.5, -0.2, 0.3])  # mean|w| = 0.4, delta = 0.28
    codes, scale = ste.twn_codes_and_scale(w)
    assert codes.tolist() == [0, -1, 1, 0, 1]
    assert abs(float(scale) - (0.9 + 0.5 + 0.3) / 3) < 1e-6
    wl = w.clone().requires_grad_(True)
    q = ste.twn_ste(wl)
    assert torch.allclose(q, codes * scale)
    q.sum().backward()
    assert torch.equal(wl.grad, torch.ones(5))  # straight through


def test_ttq_forward_and_scale_gradients():
    w = torch.tensor([1.0, -2.0, 0.01, 0.5], requires_grad=True)  # threshold 0.05 * 2 = 0.1
    wp, wn = torch.tensor([0.7], requires_grad=True), torch.tensor([0.4], requires_grad=True)
    q = ste.ttq(w, wp, wn, 0.05)
    assert torch.allclose(q, torch.tensor([0.7, -0.4, 0.0, 0.7]))
    (q * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.allclose(wp.grad, torch.tensor([5.0]))
    assert torch.allclose(wn.grad, torch.tensor([-2.0]))
    assert torch.allclose(w.grad, torch.tensor([0.7, 0.8, 3.0, 2.8]))
    assert ste.ttq_init_scales(torch.tensor([1.0, 3.0, -2.0, 0.0])) == (2.0, 2.0)
