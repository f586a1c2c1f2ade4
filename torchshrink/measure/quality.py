"""Quality evaluators: classification accuracy and output fidelity against a reference model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchshrink.core.data import Batch, as_batch, as_batches
from torchshrink.core.errors import DataError


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("logits", "last_hidden_state", "pooler_output"):
        if hasattr(out, attr):
            return getattr(out, attr)
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"cannot find an output tensor in a {type(out).__name__}")


@torch.inference_mode()
def accuracy(model: nn.Module, data: Iterable[Any]) -> float:
    """Top-1 accuracy (fraction in [0, 1]) over ``(inputs, labels)`` batches."""
    was = model.training
    model.eval()
    correct = total = 0
    for b in as_batches(data):
        labels = b.labels
        if labels is None:
            raise DataError("accuracy needs (inputs, labels) batches")
        pred = main_output(b(model)).float().argmax(-1)
        correct += int((pred == labels).sum())
        total += labels.numel()
    model.train(was)
    if total == 0:
        raise DataError("accuracy was given no data")
    return correct / total


@torch.inference_mode()
def fidelity(
    model: nn.Module, reference: nn.Module, data: Iterable[Any] | Sequence[torch.Tensor], *, metric: str = "cosine"
) -> dict[str, float]:
    """Compare outputs of ``model`` with ``reference`` on the same inputs.

    ``cosine``: per-sample cosine similarity of the flattened outputs (mean and min);
    ``kl``: KL(reference || model) of softmax outputs (mean). Also the max absolute difference.
    """
    if metric not in ("cosine", "kl"):
        raise ValueError(f"metric={metric!r}; allowed: 'cosine', 'kl'")
    if isinstance(data, tuple) and all(isinstance(t, torch.Tensor) for t in data):
        data = [data]
    cos, kls, maxdiff = [], [], 0.0
    for batch in data:
        # a tuple of tensors is the model's positional inputs here (no labels to compare with)
        run = Batch(tuple(batch)) if isinstance(batch, tuple | list) and all(isinstance(t, torch.Tensor) for t in batch) \
            else as_batch(batch)
        a = main_output(run(model)).float()
        b = main_output(run(reference)).float()
        if a.shape != b.shape:
            raise DataError(f"model output {tuple(a.shape)} differs in shape from the reference's {tuple(b.shape)}")
        maxdiff = max(maxdiff, float((a - b).abs().max()))
        if metric == "cosine":
            cos.append(F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1))
        else:
            kls.append(F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="none").sum(-1).reshape(-1))
    if metric == "cosine":
        c = torch.cat(cos)
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "max_abs_diff": maxdiff}
    k = torch.cat(kls)
    return {"kl_mean": float(k.mean()), "max_abs_diff": maxdiff}
