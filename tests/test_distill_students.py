import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchshrink as ts
from torchshrink.core.errors import ConfigError, LayerNotFoundError, UnsupportedLayerError
from torchshrink.distill import (
    add_early_exits,
    born_again,
    drop_layers,
    exit_accuracies,
    find_layer_stack,
    shrink_width,
    train_deep_supervision,
)
from torchshrink.distill.students import keep_indices
from torchshrink.recipe import Finetune
from torchshrink.zoo.digits import DigitsCNN


def tiny_bert(layers: int = 4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    return BertModel(cfg).eval()


def test_keep_indices_rules_and_errors():
    assert keep_indices(6, "every_other") == [0, 2, 4]
    assert keep_indices(6, "every_other_last") == [1, 3, 5]
    assert keep_indices(6, "spread") == [0, 2, 3, 5] or keep_indices(6, "spread") == [0, 2, 5]
    assert keep_indices(12, [0, 2, 4, 7, 9, 11]) == [0, 2, 4, 7, 9, 11]
    with pytest.raises(ConfigError, match=r"\[0, 5\]"):
        keep_indices(6, [0, 6])
    with pytest.raises(ConfigError, match="every_other"):
        keep_indices(6, "odd")


def test_drop_layers_keeps_every_other_block_initialized_from_the_teacher(tmp_path):
    teacher = tiny_bert(4)
    assert find_layer_stack(teacher) == "encoder.layer"
    student = drop_layers(teacher)
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert len(teacher.encoder.layer) == 4 and teacher.config.num_hidden_layers == 4  # teacher untouched
    for s_i, t_i in [(0, 0), (1, 2)]:
        for (k, a), b in zip(student.encoder.layer[s_i].state_dict().items(),
                             teacher.encoder.layer[t_i].state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    ids = torch.randint(0, 100, (2, 9))
    out = student(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert out.shape == (2, 9, 32)
    ts.save(student, tmp_path / "s")
    back = ts.load(tmp_path / "s")
    assert len(back.encoder.layer) == 2
    assert torch.allclose(back(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state, out, atol=1e-6)


def test_drop_layers_needs_a_block_list():
    with pytest.raises(UnsupportedLayerError, match="layers_path"):
        drop_layers(nn.Sequential(nn.Linear(2, 2)))


def test_shrink_width_digits_cnn_quarter_of_the_params(tmp_path):
    teacher = DigitsCNN().eval()
    x = torch.rand(3, 1, 8, 8)
    student = shrink_width(teacher, 0.45, x)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    assert n_s <= 0.25 * n_t
    assert [m.out_channels for m in student.features if isinstance(m, nn.Conv2d)] == [14, 29, 29]
    assert student.classifier[1].in_features == 29 * 4 and student.classifier[3].out_features == 10
    assert student(x).shape == (3, 10)
    ts.save(student, tmp_path / "w")
    back = ts.load(tmp_path / "w", model=DigitsCNN())
    assert torch.allclose(back.eval()(x), student.eval()(x), atol=1e-6)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):  # two branches from the input: not a chain
        h = self.a(x)
        return self.fc((h + self.b(x)).mean((2, 3)))


def test_shrink_width_refuses_non_chain_networks_and_bad_width():
    with pytest.raises(UnsupportedLayerError, match="chain"):
        shrink_width(_Residual(), 0.5, torch.rand(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="width"):
        shrink_width(DigitsCNN(), 1.5, torch.rand(1, 1, 8, 8))


def _digits_batches():
    from torchshrink.zoo.digits import digits_loaders

    train, _, test = digits_loaders(batch_size=128, seed=0)
    return list(train), list(test)


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def test_deep_supervision_trains_an_early_exit():
    train, test = _digits_batches()
    torch.manual_seed(0)
    model = add_early_exits(_small_cnn(), ["5"], train[0][0][:2])
    model(train[0][0][:5])
    assert model.exit_logits["5"].shape == (5, 10)
    train_deep_supervision(model, train, Finetune(epochs=8, lr=1e-2, temperature=2.0, alpha=0.3))
    acc = exit_accuracies(model, test)
    assert acc["final"] > 0.85 and acc["5"] > 0.4  # the exit sees 16 pooled channels only
    assert isinstance(model.strip(), nn.Sequential)
    with pytest.raises(LayerNotFoundError):
        add_early_exits(_small_cnn(), ["9"], train[0][0][:2])


def test_born_again_generations_are_fresh_and_learn():
    train, test = _digits_batches()
    torch.manual_seed(0)
    teacher = _small_cnn()
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(8):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(teacher(x), y).backward()
            opt.step()
    gens = born_again(teacher.eval(), train, Finetune(epochs=8, lr=1e-2), generations=2)
    assert len(gens) == 2 and all(len(g.history) == 8 for g in gens)
    from torchshrink.measure.quality import accuracy

    for g in gens:
        assert not torch.equal(g.model[0].weight, teacher[0].weight)
        assert accuracy(g.model, test) > 0.75  # chance is 0.1; 72 steps from scratch
    with pytest.raises(ConfigError, match="generations"):
        born_again(teacher, train, Finetune(), generations=0)


def test_distill_config_round_trip_and_validation():
    cfg = ts.config_from_yaml("kind: distill\nstudent: layers\nkeep: [0, 2]\nfeatures: ['a=b']\ntemperature: 2\n")
    assert cfg.keep == (0, 2) and cfg.temperature == 2.0
    assert ts.config_from_yaml(ts.config_to_yaml(cfg)) == cfg
    for bad, match in [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"),
                       ({"width": 0}, "width"), ({"features": ["ab"]}, "student_module=teacher_module"),
                       ({"student": "tiny"}, "allowed: 'width'"), ({"output_loss": "none"}, "features")]:
        with pytest.raises(ConfigError, match=match):
            ts.config_from_dict({"kind": "distill", **bad})


def test_distill_verb_builds_students_from_the_teacher():
    teacher = tiny_bert(4)
    cfg = ts.config_from_dict({"kind": "distill", "student": "layers", "keep": [1, 3]})
    student = ts.distill(teacher, cfg)
    assert len(student.encoder.layer) == 2 and len(teacher.encoder.layer) == 4
    assert torch.equal(student.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight)
    with pytest.raises(ConfigError, match="student='given'"):
        ts.distill(teacher, ts.config_from_dict({"kind": "distill", "student": "given"}))


def test_shrink_width_takes_layernorm_groupnorm_grouped_and_depthwise_convs():
    """A user's MLP with LayerNorm and a CNN with grouped / depthwise convs and GroupNorm used to be refused."""
    from torchshrink.distill.students import shrink_width

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))
    s = shrink_width(mlp, 0.5, torch.randn(2, 4))
    assert s[0].out_features == 32 and tuple(s[1].normalized_shape) == (32,) and s[5].out_features == 3
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),   # depthwise
                        nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.ReLU(),    # grouped
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
    x = torch.randn(2, 3, 8, 8)
    s = shrink_width(cnn, 0.5, x)
    assert (s[0].out_channels, s[1].num_channels) == (8, 8)
    assert (s[3].groups, s[3].in_channels, s[3].out_channels) == (8, 8, 8)
    assert s[5].groups == 4 and s[5].out_channels == 16 and s(x).shape == (2, 5)
    with pytest.raises(UnsupportedLayerError, match=r"GroupNorm '1' \(4 groups\) cannot take the shrunk layer's 6 channels"):
        shrink_width(cnn, 0.4, x)
