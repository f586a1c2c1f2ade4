import json

import pytest
import torch

import torchshrink as ts
from torchshrink.core import state
from torchshrink.core.errors import ModelLoadError
from torchshrink.models import example_inputs, parse_shape


def test_specs_build_models(tmp_path):
    m = ts.load_model("tests.conftest:tiny_net")
    assert state.get(m, "source") == "tests.conftest:tiny_net"
    torch.save(m.state_dict(), tmp_path / "w.pt")
    import safetensors.torch

    safetensors.torch.save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    for weights in ("w.pt", "w.safetensors"):
        again = ts.load_model(f"tests.conftest:tiny_net@{tmp_path / weights}")
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values(), strict=True))
    ep = torch.export.export(m, example_inputs(m))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ModelLoadError, match="--trust-code"):  # torch.export archives are pickles
        ts.load_model(str(tmp_path / "m.pt2"))
    assert torch.allclose(ts.load_model(str(tmp_path / "m.pt2"), trust_code=True)(x), m(x))


def test_hf_folder_loads_without_network(tmp_path):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(cfg).save_pretrained(tmp_path / "bert")
    m = ts.load_model(str(tmp_path / "bert"))
    assert m.config.hidden_size == 16
    ids, mask = example_inputs(m, batch=2, seq=8)
    assert ids.shape == (2, 8) and int(ids.max()) < 100


def test_hf_folder_loads_with_the_head_class_its_config_names(tmp_path):
    """A *ForCausalLM / *ForSequenceClassification folder keeps its head (was: rebuilt as the bare model);
    a class name transformers does not register for that model type falls back to the bare model."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)).eval()
    lm.save_pretrained(tmp_path / "lm")
    back = ts.load_model(str(tmp_path / "lm"))
    ids = torch.randint(0, 64, (1, 5))
    assert type(back).__name__ == "LlamaForCausalLM" and torch.allclose(back(ids).logits, lm(ids).logits, atol=1e-6)
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    cfg["architectures"] = ["os.system"]  # a name from the file is only ever looked up among registered classes
    (tmp_path / "lm" / "config.json").write_text(json.dumps(cfg))
    assert type(ts.load_model(str(tmp_path / "lm"))).__name__ == "LlamaModel"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("torchvision:resnet1800", "unknown torchvision model 'resnet1800'"),
        ("zoo:nothing", "unknown zoo model 'nothing'; known: zoo:digits-cnn"),
        ("no_such_pkg.mod:factory", "cannot import 'no_such_pkg.mod'"),
        ("./missing_folder", "no such file or folder"),
        ("weights.safetensors", "holds weights only"),
        ("gibberish", "cannot understand model spec 'gibberish'"),
    ],
)
def test_bad_specs_give_one_clear_line(spec, message):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")) as e:
        ts.load_model(spec)
    assert "\n" not in str(e.value)


def test_pickled_module_is_refused(tmp_path):
    m = ts.load_model("tests.conftest:tiny_net")
    torch.save(m, tmp_path / "whole.pt")  # a full pickle, not a state dict
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        ts.load_model(f"tests.conftest:tiny_net@{tmp_path / 'whole.pt'}")


def test_parse_shape():
    assert parse_shape("1,3,224,224") == [1, 3, 224, 224]
    with pytest.raises(ModelLoadError, match="write it like 1,3,224,224"):
        parse_shape("1,three")


@pytest.mark.parametrize("spec,msg", [("sys:exit", "tried to exit"), ("os:getcwd", "returned str, not a torch.nn.Module"),
                                      ("json:loads", "raised TypeError")])
def test_a_factory_that_does_not_return_a_module_is_one_clear_error(spec, msg):
    with pytest.raises(ModelLoadError, match=msg):
        ts.load_model(spec)


def test_hf_folder_declaring_a_huge_model_is_refused_before_allocating(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    data = json.loads((tmp_path / "bert" / "config.json").read_text())
    data.update(vocab_size=1 << 24, hidden_size=4096, num_attention_heads=32)
    (tmp_path / "bert" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="declares a model of"):
        ts.load_model(str(tmp_path / "bert"))
