"""No silently broken model leaves structured pruning: the pruned model is run on the trace batch and
on the same batch at another batch size, and must run, give outputs of the original's shapes, and
finite values; otherwise the whole call refuses with one line (the user's model is untouched: handlers
work on a copy). This catches what tracing cannot see, e.g. a channel count written as a Python
constant inside ``forward`` (``x.reshape(n, 8)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.measure.quality import main_output
from torchshrink.prune.structured.trace import call_model


def _resize(batch: Any) -> Any:
    """The batch at another batch size: its first row, or (for one row) two copies."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        return t[:1] if t.shape[0] > 1 else torch.cat([t, t])

    if isinstance(batch, dict):
        return {k: one(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(one(t) for t in batch)
    return one(batch)


def probe_batch(model: nn.Module, data: Any) -> Any:
    """A batch to check with: the trace batch, else for a transformers model a short token batch, else None."""
    from torchshrink.core.errors import DataError
    from torchshrink.prune.structured.channel import first_batch

    try:
        return first_batch(model, data)
    except DataError:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 2:
            return None
        ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def reference(model: nn.Module, batch: Any) -> list[tuple[Any, torch.Size]]:
    """(batch, output shape) of the unpruned model on the trace batch and on the resized one."""
    out: list[tuple[Any, torch.Size]] = []
    if batch is None:
        return out
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in (batch, _resize(batch)):
                try:
                    out.append((b, main_output(call_model(model, b)).shape))
                except Exception:  # noqa: BLE001 - a model that cannot take the resized batch: check the first only
                    continue
    finally:
        model.train(was)
    return out


def verify(pruned: nn.Module, refs: list[tuple[Any, torch.Size]], kind: str) -> None:
    """Refuse (one line) a pruned model that fails to run, changes its output shape or gives non-finite values."""
    was = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            for b, shape in refs:
                try:
                    y = main_output(call_model(pruned, b))
                except Exception as e:  # noqa: BLE001 - whatever the broken forward raises
                    why = f"it fails to run ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
                else:
                    if y.shape == shape and bool(torch.isfinite(y.float()).all()):
                        continue
                    why = (f"its output shape changed from {tuple(shape)} to {tuple(y.shape)}" if y.shape != shape
                           else "it gives non-finite outputs")
                raise UnsupportedLayerError(
                    f"{kind} refused: the pruned model was checked on the trace batch and {why}; the model's forward "
                    "probably uses a size the tracer cannot follow (e.g. a channel count written in Python); "
                    "leave those layers out with select / ignore")
    finally:
        pruned.train(was)
