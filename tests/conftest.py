import os
import tempfile

import pytest
import torch

# The digits teachers are cached per test session in a private folder, so tests never depend on
# (or write to) the user's cache; the first test that needs one trains it (seconds).
_CACHE = tempfile.mkdtemp(prefix="torchshrink-test-cache-")
os.environ.setdefault("TORCHSHRINK_CACHE", _CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    net._torchshrink_input = {"shape": [2, 3, 4, 4], "dtype": "float32"}
    return net


@pytest.fixture
def tiny():
    return tiny_net()
