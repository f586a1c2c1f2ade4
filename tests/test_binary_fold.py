"""Folding fully binary layers' activation thresholds into the BatchNorm that feeds them: the binarize
stage drops a ReLU between BatchNorm and a bnn / xnor layer (sign is the nonlinearity), finalize moves
the threshold into the BatchNorm bias, and the stored layer keeps nothing but its bits."""

import copy
import itertools

import pytest
import torch
from torch import nn

import torchshrink
from torchshrink.binary import BinaryLinear, BNNConfig, XNORConfig, convert
from torchshrink.binary.fold import fold_into_neighbours, fold_thresholds, sign_sources
from torchshrink.binary.handler import finalize_binarize
from torchshrink.binary.ste import sign
from torchshrink.zoo import digits_loaders

torch.set_num_threads(1)


def _digits(n: int = 4) -> tuple[list[torch.Tensor], torch.Tensor]:
    train, _, test = digits_loaders(batch_size=64, seed=0)
    return [x for x, _ in itertools.islice(train, n)], torch.cat([x for x, _ in test])


@pytest.mark.parametrize("cls", [XNORConfig, BNNConfig])
def test_digits_thresholds_fold_into_batchnorm_and_outputs_stay(digits_cnn, cls, tmp_path):
    calib, x = _digits()
    cfg = cls(keep_dtype="float32", param_dtype="float32")
    prepared = torchshrink.prepare(digits_cnn, cfg, data=calib).eval()
    report = torchshrink.report(prepared)[-1].notes
    assert report["threshold_into"] == {"features.3": "features.1", "features.7": "features.4",
                                        "classifier.1": "features.8"}
    # ReLUs feeding binary layers became Identity; the one feeding the float classifier layer stays
    assert [type(prepared.features[i]) for i in (2, 5, 9)] == [nn.Identity] * 3
    assert type(prepared.classifier[2]) is nn.ReLU and type(digits_cnn.features[2]) is nn.ReLU
    # the Linear after Flatten shares one threshold per channel of the 64 x 2 x 2 input
    fc1 = prepared.classifier[1]
    assert fc1.act_threshold.shape == (64,) and fc1.act_threshold.abs().sum() > 0
    with torch.no_grad():
        ref = prepared(x)
        out = finalize_binarize(copy.deepcopy(prepared), cfg)
        for name in report["binarized"]:
            assert "act_threshold" not in dict(out.get_submodule(name).named_buffers()), name
        assert not out.get_submodule("features.7").thresholded
        got = out(x)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(1), ref.argmax(1))
        torchshrink.save(out, tmp_path / "m")
        assert torch.equal(torchshrink.load(tmp_path / "m")(x), got)


def test_fold_on_training_model_keeps_its_output(digits_cnn):
    calib, x = _digits(2)
    prepared = torchshrink.prepare(digits_cnn, XNORConfig(), data=calib).eval()
    bias = prepared.features[4].bias.detach().clone()
    tau = prepared.features[7].act_threshold.detach().clone()
    with torch.no_grad():
        ref = prepared(x)
        assert fold_thresholds(prepared) == ["features.3", "features.7", "classifier.1"]
        assert torch.allclose(prepared(x), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(prepared.features[7].act_threshold, torch.zeros(64))
    assert torch.allclose(prepared.features[4].bias, bias - tau)


class _Residual(nn.Module):
    """bn -> relu feeds a binary conv AND a skip connection: the ReLU must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)  # no BN before it: conv1 -> bn1 + skip -> relu
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn0(self.conv0(x)))
        h = torch.relu(self.bn1(self.conv1(h)) + h)
        return self.head(self.conv2(h).mean((2, 3)))


def test_no_fold_where_the_relu_has_other_consumers_or_no_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5, 5)
    prepared = torchshrink.prepare(_Residual().eval(), XNORConfig(), data=[x]).eval()
    assert torchshrink.report(prepared)[-1].notes["binarized"] == ["conv1", "conv2"]
    assert torchshrink.report(prepared)[-1].notes["threshold_into"] == {}
    assert type(prepared.relu) is nn.ReLU
    packed = convert(prepared, fold=True)
    assert packed.conv1.thresholded and packed.conv2.thresholded
    assert packed.conv1.act_threshold.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(packed(x), prepared(x), atol=1e-4, rtol=1e-4)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 3)).eval()


def test_no_fold_when_disabled_functional_relu_or_untraceable(tiny):
    x = torch.randn(4, 3, 4, 4)
    off = torchshrink.prepare(_mlp(), XNORConfig(fold_threshold=False), data=[torch.randn(16, 6)]).eval()
    assert torchshrink.report(off)[-1].notes["threshold_into"] == {} and type(off[2]) is nn.ReLU
    assert fold_thresholds(off) == [] and convert(off, fold=True)[3].thresholded  # the ReLU blocks the fold
    # tiny: torch.relu (a function, not a module) between its BN and fc1 cannot be swapped
    prepared = torchshrink.prepare(tiny, BNNConfig(), data=[x]).eval()
    assert torchshrink.report(prepared)[-1].notes["threshold_into"] == {}
    assert convert(prepared, fold=True).fc1.thresholded

    class Branching(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) if x.sum() > 0 else -super().forward(x)  # data-dependent: no fx trace

    net = Branching(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    assert sign_sources(net, allow_relu=True) == {}
    assert torchshrink.report(torchshrink.prepare(net, BNNConfig()))[-1].notes["threshold_into"] == {}


def test_batchnorm1d_mlp_folds_and_uneven_packed_thresholds_do_not():
    x = torch.randn(32, 6)
    prepared = torchshrink.prepare(_mlp(), XNORConfig(), data=[x]).eval()
    assert torchshrink.report(prepared)[-1].notes["threshold_into"] == {"3": "1", "7": "4"}
    plain = convert(prepared)  # no fold: per-feature thresholds stored
    assert plain[3].act_threshold.shape == (16,)
    plain[7].act_threshold.copy_(torch.linspace(-1, 1, 8))
    folded = copy.deepcopy(plain)
    assert fold_into_neighbours(folded) == ["3", "7"]  # shapes fit: BatchNorm1d(8) -> Flatten -> Linear(8)
    with torch.no_grad():
        assert torch.allclose(folded(x), plain(x), atol=1e-4, rtol=1e-4)
    # a Linear after Flatten of 4 channels x 2 positions whose thresholds differ within a channel
    net2 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(8, 5), nn.Linear(5, 2)).eval()
    prepared2 = torchshrink.prepare(net2, BNNConfig()).eval()
    assert prepared2[3].act_threshold.shape == (4,)  # prepared to share one threshold per channel
    prepared2[3].share_threshold(8)  # a user's own per-feature thresholds instead
    with torch.no_grad():
        prepared2[3].act_threshold.copy_(torch.arange(8.0))
    packed = convert(prepared2)
    assert sign_sources(packed) and fold_thresholds(packed) == [] and packed[3].thresholded
    # max-pooling the flattened features mixes channels: a per-channel shift no longer commutes
    net3 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.MaxPool1d(2),
                         nn.Linear(4, 5), nn.Linear(5, 2)).eval()
    prepared3 = torchshrink.prepare(net3, XNORConfig(), data=[torch.randn(8, 3, 1, 2)])
    assert torchshrink.report(prepared3)[-1].notes["threshold_into"] == {} and type(prepared3[2]) is nn.ReLU


def test_shared_threshold_layer_and_its_errors():
    layer = BinaryLinear(12, 5, mode="xnor", act_channels=3)
    assert layer.act_threshold.shape == (3,) and layer.init_args()["act_channels"] == 3
    clone = BinaryLinear(**layer.init_args())
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer.act_threshold.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.zeros(2, 12)
    a, xs = layer.binarize_input(x)
    assert torch.equal(xs[0], torch.tensor([-0.5] * 4 + [0.5] * 4 + [0.0] * 4))
    assert torch.equal(a, sign(xs))
    with pytest.raises(ValueError, match="act_channels=5 does not fit 12 inputs; allowed: a divisor of 12"):
        layer.share_threshold(5)
    with pytest.raises(ValueError, match="mode='bwn' has no activation threshold; allowed: bnn, xnor"):
        BinaryLinear(12, 5, mode="bwn").share_threshold(3)
