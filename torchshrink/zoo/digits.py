"""scikit-learn's digits (1,797 real 8x8 handwritten digits, UCI ML hand-written digits data set,
CC BY 4.0) embedded as ``data/digits.csv.gz``, with a fixed train/val/test split, and two small
teachers trained on demand and cached in the user's cache dir."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchshrink.core.cache import cache_dir

log = logging.getLogger(__name__)
_DATA = Path(__file__).parent / "data" / "digits.csv.gz"
SPLIT_SEED = 20240611


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_DATA, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return raw[:, :64].reshape(-1, 1, 8, 8) / 16.0, raw[:, 64].astype(np.int64)


@dataclass(frozen=True)
class DigitsSplits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset


def digits_splits() -> DigitsSplits:
    """Fixed 60/20/20 stratified-by-shuffle split (seeded), identical on every machine."""
    x, y = load_digits_arrays()
    idx = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]
    ds = [TensorDataset(torch.from_numpy(x[p]), torch.from_numpy(y[p])) for p in parts]
    return DigitsSplits(*ds)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    s = digits_splits()
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(s.train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(s.val, batch_size=256),
        DataLoader(s.test, batch_size=256),
    )


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (~29k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """LeNet-300-100 style MLP on the 64 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_ARCH = {"digits-cnn": DigitsCNN, "digits-mlp": DigitsMLP}
# (epochs, lr, weight decay, shift augmentation) per teacher; bump _TRAIN_VERSION when changing
# training. Measured on the validation split (5 seeds, 30 epochs, OneCycle AdamW): one-pixel shifts
# cost the CNN ~1 pp (val mean 0.9851 with shifts on every epoch, 0.9916 on the first half only,
# 0.9950 without) and the MLP ~2 pp, so neither teacher is trained with them.
_TRAIN = {"digits-cnn": (30, 3e-3, 1e-4, False), "digits-mlp": (60, 2e-3, 1e-4, False)}
_TRAIN_VERSION = 2


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (off for the zoo teachers: they cost validation accuracy, measured)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_digits(name: str, seed: int = 0, epochs: int | None = None) -> nn.Module:
    """Train a digits teacher from scratch (deterministic for a seed on one machine)."""
    torch.manual_seed(seed)
    model = _ARCH[name]()
    ep, lr, wd, aug = _TRAIN[name]
    ep = epochs or ep
    train, _, _ = digits_loaders(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=ep * len(train))
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(ep):
        for x, y in train:
            loss = F.cross_entropy(model(_augment(x, g) if aug else x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _cache_key(name: str) -> str:
    h = hashlib.sha256(f"{name}-{_TRAIN[name]}-{_TRAIN_VERSION}-{SPLIT_SEED}".encode()).hexdigest()[:12]
    return f"{name}-{h}.safetensors"


def digits_teacher(name: str = "digits-cnn", *, retrain: bool = False) -> nn.Module:
    """A trained digits teacher, from the cache or trained now (seconds) and cached atomically."""
    import safetensors.torch

    if name not in _ARCH:
        raise KeyError(f"unknown digits model {name!r}; known: {', '.join(_ARCH)}")
    path = cache_dir() / _cache_key(name)
    model = _ARCH[name]()
    if path.is_file() and not retrain:
        try:
            model.load_state_dict(safetensors.torch.load_file(str(path)))
            return model.eval()
        except Exception:  # a corrupt cache entry is retrained, not trusted
            log.warning("cache entry %s is unreadable; retraining", path)
    t0 = time.perf_counter()
    model = train_digits(name)
    log.info("trained %s in %.1f s", name, time.perf_counter() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(model.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model
