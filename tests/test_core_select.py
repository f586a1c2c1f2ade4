import pytest
import torch

from torchshrink.core.config import config_from_dict
from torchshrink.core.errors import ConfigError, LayerNotFoundError
from torchshrink.core.select import Select, config_for, select_modules
from torchshrink.core.surgery import get_module, set_module


def names(model, sel, types=("Linear", "Conv2d")):
    return [n for n, _ in select_modules(model, sel, types)]


def test_select_by_type_glob_regex_and_exclude(tiny):
    assert names(tiny, None) == ["conv", "fc1", "fc2"]
    assert names(tiny, Select(types=("Linear",))) == ["fc1", "fc2"]
    assert names(tiny, Select(include=("fc*",))) == ["fc1", "fc2"]
    assert names(tiny, Select(include=("re:^fc[2]$",))) == ["fc2"]
    assert names(tiny, Select(exclude=("fc2",))) == ["conv", "fc1"]
    assert names(tiny, Select(types=("torch.nn.modules.batchnorm.BatchNorm2d",))) == ["bn"]


def test_exact_name_typo_is_an_error_with_close_names(tiny):
    with pytest.raises(LayerNotFoundError, match="no layer named 'fc3'.*close names: fc[12], fc[12]"):
        select_modules(tiny, Select(include=("fc3",)))


def test_selection_matching_nothing_is_an_error(tiny):
    with pytest.raises(LayerNotFoundError, match="matched no layer"):
        select_modules(tiny, Select(types=("LSTM",)))
    assert select_modules(tiny, Select(types=("LSTM",)), allow_empty=True) == []


def test_overrides_apply_per_layer_and_are_validated():
    cfg = config_from_dict({"kind": "cast", "dtype": "bfloat16"})
    sel = Select(overrides={"fc*": {"dtype": "float16"}})
    assert config_for("fc1", cfg, sel).dtype == "float16"
    assert config_for("conv", cfg, sel).dtype == "bfloat16"
    with pytest.raises(ConfigError, match="unknown field 'bits'"):
        config_for("fc1", cfg, Select(overrides={"fc1": {"bits": 4}}))
    with pytest.raises(ConfigError, match="'float8'"):
        config_for("fc1", cfg, Select(overrides={"fc1": {"dtype": "float8"}}))


def test_select_from_dict_rejects_unknown_keys_and_bad_regex():
    with pytest.raises(ConfigError, match="unknown select field 'typez'"):
        Select.from_dict({"typez": ["Linear"]})
    with pytest.raises(ConfigError, match="invalid regular expression"):
        Select(include=("re:([",))


def test_surgery_get_and_set(tiny):
    new = torch.nn.Linear(32, 10)
    old = set_module(tiny, "fc2", new)
    assert get_module(tiny, "fc2") is new and isinstance(old, torch.nn.Linear) and old is not new
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    set_module(seq, "0", torch.nn.Identity())
    assert isinstance(seq[0], torch.nn.Identity)
    with pytest.raises(LayerNotFoundError, match="no layer named 'fc9'"):
        get_module(tiny, "fc9")


class ReadsWeight(torch.nn.Module):
    """A parent that hands its child's weight to a function itself (as torchvision's Swin does with qkv)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.nn.functional.linear(x, self.proj.weight, self.proj.bias).relu())


def test_a_layer_whose_parent_reads_its_weight_is_not_swapped_and_the_model_still_runs():
    import torchshrink as ts

    torch.manual_seed(0)
    m = ReadsWeight().eval()
    assert names(m, None, ("Linear",)) == ["proj", "out"]  # chosen as usual when nothing is swapped
    x = torch.randn(8, 16)
    for cfg in (ts.Int8DynamicConfig(), ts.WeightOnlyConfig(bits=8, group_size=0), ts.SVDConfig(ratio=0.5)):
        q = ts.apply(m, cfg)
        assert type(q.proj) is torch.nn.Linear and type(q.out) is not torch.nn.Linear, cfg.kind
        assert q(x).shape == (8, 4)
        skipped = ts.report(q)[-1].skipped
        assert skipped["proj"].startswith("ReadsWeight.forward reads self.proj.weight itself"), skipped


def test_a_linear_or_conv_subclass_counts_as_plain_only_when_it_computes_the_same():
    """Libraries subclass nn.Linear with the same math (timm's Linear casts for AMP): measured equal on a probe,
    it is compressed like a Linear; a subclass that computes something else (a scale, another padding) is not."""
    import torch.nn.functional as F
    from torch import nn

    import torchshrink as ts
    from torchshrink.core.select import is_plain

    class SameLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype), self.bias)

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class SamePadConv(nn.Conv2d):  # pads asymmetrically, as TF-style 'same' convolutions do
        def forward(self, x):
            return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    torch.manual_seed(0)
    assert is_plain(nn.Linear(4, 3), nn.Linear) and is_plain(SameLinear(4, 3), nn.Linear)
    assert not is_plain(ScaledLinear(4, 3), nn.Linear) and not is_plain(nn.Linear(4, 3), nn.Conv2d)
    assert is_plain(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d)
    assert not is_plain(SamePadConv(3, 4, 2, stride=2), nn.Conv2d)
    model = nn.Sequential(SameLinear(16, 16), nn.ReLU(), ScaledLinear(16, 4)).eval()
    q = ts.quantize(model, ts.Int8DynamicConfig(), data=[torch.randn(8, 16)])
    assert type(q[0]).__name__ == "Int8DynamicLinear" and type(q[2]) is ScaledLinear
    assert "ScaledLinear has no INT8 dynamic kernel" in ts.report(q)[-1].skipped["2"]


def test_a_layer_whose_weight_a_module_above_its_parent_reads_is_not_swapped():
    """Hugging Face's ViTModel.forward reads self.embeddings.patch_embeddings.projection.weight.dtype: cast made that
    Conv2d a CastWrapper and the model crashed ('no attribute weight'). The read is found through the attribute path
    from any module above the layer, and the layer is left as it is, with the reason."""
    from torch import nn

    import torchshrink as ts

    class Patch(nn.Module):
        def __init__(self):
            super().__init__()
            self.projection = nn.Conv2d(3, 8, 2, stride=2)

        def forward(self, x):
            return self.projection(x)

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = Patch()

        def forward(self, x):
            return self.patch(x)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Embed()
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            x = x.to(self.embed.patch.projection.weight.dtype)
            return self.head(self.embed(x).mean((2, 3)))

    q = ts.apply(Model().eval(), ts.CastConfig(), data=[torch.randn(2, 3, 8, 8)])
    assert q(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    skipped = ts.report(q)[-1].skipped
    assert "Model.forward reads self.embed.patch.projection.weight itself" in skipped["embed.patch.projection"]
    assert type(q.head).__name__ == "CastWrapper"
