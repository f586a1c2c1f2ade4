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
    if isinstance(out, dict) and out and isinstance(first := next(iter(out.values())), torch.Tensor):
        return first  # a plain dict: its first value, which is also output 0 of its ONNX export
    raise DataError(f"cannot find an output tensor in a {type(out).__name__}")


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``a`` with the same row of ``b`` (rows flattened), whatever the outputs' scale.

    ``F.cosine_similarity`` clamps the product of the norms at 1e-8: outputs of norm below 1e-4 (a random-init
    EfficientNet's logits are ~1e-14) came out near 0 even against themselves. Each row is scaled by its own
    largest magnitude first (cosine does not change) and computed in float64; two identical rows are 1.0 (two
    all-zero rows included), a zero row against a non-zero one 0.0."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    same = (a == b).all(dim=1)
    a = a / a.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    b = b / b.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(same, 1.0, F.cosine_similarity(a, b, dim=1))


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
            cos.append(cosine_rows(a, b))
        else:
            kls.append(F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="none").sum(-1).reshape(-1))
    if metric == "cosine":
        c = torch.cat(cos)
        return {"cosine_mean": float(c.mean()), "cosine_min": float(c.min()), "max_abs_diff": maxdiff}
    k = torch.cat(kls)
    return {"kl_mean": float(k.mean()), "max_abs_diff": maxdiff}
