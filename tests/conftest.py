import os
import tempfile

import pytest
import torch

# The digits teachers are cached per test session in a private folder, so tests never depend on
# (or write to) the user's cache; the first test that needs one trains it (seconds).
_CACHE = tempfile.mkdtemp(prefix="torchshrink-test-cache-")
os.environ.setdefault("TORCHSHRINK_CACHE", _CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from torchshrink.core import state  # noqa: E402  (after the cache folder is set)

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription


@pytest.fixture(scope="session")
def digits_cnn():
    from torchshrink.models import load_model

    return load_model("zoo:digits-cnn")


@pytest.fixture(scope="session")
def digits_mlp():
    from torchshrink.models import load_model

    return load_model("zoo:digits-mlp")


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_net():
    torch.manual_seed(0)
    net = TinyNet().eval()
    state.put(net, input={"shape": [2, 3, 4, 4], "dtype": "float32"})
    return net


def conv_net():
    """A CNN whose convs are wide enough for low-rank forms to be smaller than the dense ones."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    state.put(net, input={"shape": [2, 3, 4, 4], "dtype": "float32"})
    return net


@pytest.fixture
def tiny():
    return tiny_net()


def tiny_bert() -> tuple:
    """A 2-layer BERT (hidden 64, 4 heads, no weights downloaded) and two (ids, mask) batches; a fresh model each call."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(4)
    data = [(torch.randint(0, 120, (4, 16), generator=g), torch.ones(4, 16, dtype=torch.long)) for _ in range(2)]
    return m, data
