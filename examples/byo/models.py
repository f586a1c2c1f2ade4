"""Two models of your own, as a user of torchshrink writes them: a small CNN for 3x32x32 images and
an MLP for a table of 13 features. torchshrink knows nothing about these classes: the CLI builds them
from `models:cnn` / `models:mlp` (this folder is on the import path, as with `python -m`)."""

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.head(self.features(x))


class TabularMLP(nn.Module):
    def __init__(self, features: int = 13, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, classes))

    def forward(self, x):
        return self.net(x)


def cnn() -> nn.Module:
    return SmallCNN()


def mlp() -> nn.Module:
    return TabularMLP()
