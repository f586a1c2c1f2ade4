"""The one data contract: every accepted batch form reads the same way in every technique."""

import pytest
import torch
from torch import nn

import torchshrink as ts
from torchshrink.core.data import Batch, as_batch, as_batches, calibration
from torchshrink.core.errors import DataError

X = torch.randn(4, 6)
Y = torch.tensor([0, 1, 2, 1])
IDS = torch.randint(5, 50, (2, 7))
MASK = torch.ones(2, 7, dtype=torch.long)


@pytest.mark.parametrize("item,inputs,labels,kwargs", [
    (X, (X,), None, {}),
    ((X, Y), (X,), Y, {}),
    ([X, Y], (X,), Y, {}),
    ((IDS, MASK), (IDS, MASK), None, {}),                       # a token pair is two inputs
    ((IDS, IDS), (IDS,), IDS, {}),                              # same shape, token ids: (inputs, labels) of an LM
    (((X, X), Y), (X, X), Y, {}),
    (((X,), {"scale": 2.0}), (X,), None, {"scale": 2.0}),
    ({"input_ids": IDS, "attention_mask": MASK, "token_type_ids": MASK * 0, "labels": Y[:2]},
     (IDS, MASK), Y[:2], {"token_type_ids": MASK * 0}),
    (({"input_ids": IDS}, Y[:2]), (IDS,), Y[:2], {}),
    ((X, X, X), (X, X, X), None, {}),
    ((X, None), (X,), None, {}),
])
def test_every_form_becomes_one_batch(item, inputs, labels, kwargs):
    b = as_batch(item)
    assert len(b.inputs) == len(inputs) and all(torch.equal(a, e) for a, e in zip(b.inputs, inputs, strict=True))
    assert (b.labels is None) == (labels is None) and (labels is None or torch.equal(b.labels, labels))
    assert set(b.kwargs) == set(kwargs)


def test_one_batch_or_many():
    assert len(list(as_batches(X))) == 1  # a tensor is one batch, not its rows
    assert len(list(as_batches((X, Y)))) == 1  # a tuple is one batch
    assert len(list(as_batches([(X, Y)] * 3))) == 3  # a list (or a loader) holds batches
    assert len(list(as_batches([X] * 5, limit=2))) == 2
    assert as_batch(Batch((X,))).size == 4


def test_bad_batches_are_one_line():
    for bad in ("text", [object()], ({"labels": Y},)):
        with pytest.raises(DataError, match="use a tensor, a tokenizer dict") as e:
            list(as_batches(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="needs calibration data"):
        calibration(None)
    with pytest.raises(DataError, match="empty"):
        calibration([])


def test_a_batch_runs_a_model_with_its_keyword_inputs():
    class Scaled(nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    assert torch.equal(as_batch(((X,), {"scale": 3.0}))(Scaled()), X * 3)


def test_labelled_batches_calibrate_data_aware_svd():
    """(inputs, labels) used to be read as two inputs by low-rank calibration (a raw TypeError)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    out = ts.factorize(m, ts.config_from_dict({"kind": "svd", "data_aware": True, "rank": 2}), data=[(X, Y)])
    assert out(X).shape == (4, 3)


def test_one_calibration_pass_restores_the_model_and_passes_keyword_inputs():
    from torchshrink.core.data import calibrate

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x, scale=1.0):
            return self.fc(x * scale)

    m = Scaled().train()
    seen = []
    n = calibrate(m, [((X,), {"scale": 2.0}), X], {"fc": lambda mod, args: seen.append(float(args[0].abs().sum()))},
                  pre=True)
    assert n == 2 and seen[0] == pytest.approx(2 * seen[1]) and m.training
    assert not m.fc._forward_pre_hooks
    with pytest.raises(DataError, match=r"calibration batch of shapes \[\(4, 3\)\] does not fit the model") as e:
        calibrate(m, [torch.randn(4, 3)], {"fc": lambda *a: None})
    assert "\n" not in str(e.value) and m.training and not m.fc._forward_hooks


class _Gated(nn.Module):
    """A model whose output depends on a keyword input: dropping it changes every figure."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x, gain=1.0):
        return self.fc(torch.relu(self.conv(x * gain)).flatten(1))


def _kw_batches(n=3, gain=50.0):
    g = torch.Generator().manual_seed(1)
    return [((torch.rand(4, 1, 8, 8, generator=g),), {"gain": gain}) for _ in range(n)]


def test_keyword_inputs_reach_static_calibration():
    """Calibrated on x * 50, the activation grid must cover that range (it covered x * 1 before)."""
    torch.manual_seed(0)
    m = _Gated().eval()
    batches = _kw_batches()
    q = ts.quantize(m, ts.Int8StaticConfig(), data=batches)
    x, kw = batches[0][0][0], batches[0][1]
    ref, got = m(x, **kw), q(x, **kw)
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.99


def test_keyword_inputs_reach_the_training_loop_distillation_and_prune_gradients():
    from torchshrink.core.train import Finetune, finetune
    from torchshrink.distill.distiller import Distiller
    from torchshrink.prune.common import accumulate_grads

    torch.manual_seed(0)
    m = _Gated()
    seen = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("gain")), with_kwargs=True)
    labelled = [Batch((x,), torch.randint(0, 10, (4,)), {"gain": 2.0}) for (x,), _ in _kw_batches(2)]
    finetune(m, labelled, Finetune(epochs=1))
    assert seen and all(g == 2.0 for g in seen)
    seen.clear()
    accumulate_grads(m, [("fc", m.fc)], _kw_batches(2, gain=3.0))
    assert seen == [3.0, 3.0]
    seen.clear()
    Distiller(_Gated(), m, output_loss="mse").loss(m, as_batch(_kw_batches(1, gain=4.0)[0]))
    assert seen == [4.0, 4.0]  # check() and the loss both ran the student with the keyword input


def test_a_loss_written_for_positional_inputs_is_adapted_and_refuses_keyword_batches():
    from torchshrink.core.train import Finetune, finetune

    m = _Gated()
    calls = []

    def old_style(student, inputs, labels):
        calls.append(len(inputs))
        return student(*inputs).pow(2).mean()

    finetune(m, [torch.rand(2, 1, 8, 8)], Finetune(epochs=1), loss_fn=old_style)
    assert calls == [1]
    with pytest.raises(DataError, match=r"takes \(student, inputs, labels\) but the batches carry keyword inputs \(gain\)"):
        finetune(m, _kw_batches(1), Finetune(epochs=1), loss_fn=old_style)
