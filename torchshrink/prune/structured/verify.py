"""No silently broken model leaves structured pruning: the pruned model is run on the trace batch, on
it at another batch size and at another spatial / sequence length, and must run, give outputs of the
original's shapes, and finite values; otherwise the whole call refuses with one line (the user's model
is untouched: handlers work on a copy). This catches what tracing cannot see, e.g. a channel count
written as a Python constant inside ``forward`` (``x.reshape(n, 8)``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchshrink.core.data import Batch
from torchshrink.core.errors import UnsupportedLayerError
from torchshrink.measure.quality import main_output
from torchshrink.prune.structured.trace import call_model


def _map_batch(batch: Any, one: Any) -> Any:
    """``one`` applied to every input of a batch (a tensor, a tuple/list, a dict or a Batch)."""
    if isinstance(batch, Batch):
        return Batch(tuple(one(t) for t in batch.inputs), None, {k: one(v) for k, v in batch.kwargs.items()})
    if isinstance(batch, dict):
        return {k: one(v) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(one(t) for t in batch)
    return one(batch)


def _resize(batch: Any) -> Any:
    """The batch at another batch size: its first row, or (for one row) two copies."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        return t[:1] if t.shape[0] > 1 else torch.cat([t, t])

    return _map_batch(batch, one)


def _reshaped(batch: Any) -> Any:
    """The batch at another size along its usual dynamic dims (3/4 of it): the spatial dims of images
    ``(N, C, H, W)``, the length of signals ``(N, C, L)`` and of token ids ``(N, T)``; None if it has none."""
    import torch.nn.functional as F

    changed = [False]

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point() and t.dim() in (3, 4) and min(t.shape[2:]) >= 8:
            changed[0] = True
            return F.interpolate(t, size=tuple(n * 3 // 4 for n in t.shape[2:]))
        if not t.is_floating_point() and t.dim() == 2 and t.shape[1] >= 4:
            changed[0] = True
            return t[:, : t.shape[1] * 3 // 4]
        return t

    out = _map_batch(batch, one)
    return out if changed[0] else None


def probe_batch(model: nn.Module, data: Any) -> Any:
    """A batch to check with: the trace batch, else for a transformers model a short token batch, else None."""
    from torchshrink.core.errors import DataError
    from torchshrink.prune.structured.channel import first_batch

    try:
        batch = first_batch(model, data)
    except DataError:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 2:
            return None
        ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return _small(model, batch)


def _small(model: nn.Module, batch: Any, rows: int = 2, tokens: int = 64) -> Any:
    """The batch cut to ``rows`` rows and token ids (integer ``(N, T)`` tensors) to ``tokens`` positions,
    when the model runs on that: the flow probes and the checks
    run the model dozens of times, and a calibration batch of 16 x 512 tokens made that minutes on a
    135M-parameter LM (measured: 500 s for ffn-prune of SmolLM2, 31 forwards). Else the batch as given."""
    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        t = t[:rows]
        return t[:, :tokens] if not t.is_floating_point() and t.dim() == 2 else t

    small = _map_batch(batch, one)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            main_output(call_model(model, small))
    except Exception:  # noqa: BLE001 - a model that needs its inputs whole: keep them whole
        return batch
    finally:
        model.train(was)
    return small


def reference(model: nn.Module, batch: Any) -> list[tuple[Any, torch.Size]]:
    """(batch, output shape) of the unpruned model on the trace batch, on it at another batch size and at
    another spatial / sequence size (each variant the original model cannot take is left out)."""
    out: list[tuple[Any, torch.Size]] = []
    if batch is None:
        return out
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in (batch, _resize(batch), _reshaped(batch)):
                if b is None:
                    continue
                try:
                    out.append((b, main_output(call_model(model, b)).shape))
                except Exception:  # noqa: BLE001 - a model that cannot take the resized batch: check the first only
                    continue
    finally:
        model.train(was)
    return out


def run_outputs(model: nn.Module, refs: list[tuple[Any, torch.Size]]) -> list[torch.Tensor]:
    """The model's main output on each reference batch (eval mode, no grad)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [main_output(call_model(model, b)) for b, _ in refs]
    finally:
        model.train(was)


def problem(pruned: nn.Module, refs: list[tuple[Any, torch.Size]], masked: list[torch.Tensor] | None = None,
            rtol: float = 1e-3) -> str | None:
    """Why the pruned model is broken, or None: it must run on every reference batch, keep the output
    shape, give finite values and, where ``masked`` (the masked original's outputs) is given, equal them
    to ``rtol`` of their largest magnitude."""
    try:
        ys = run_outputs(pruned, refs)
    except Exception as e:  # noqa: BLE001 - whatever the broken forward raises
        return f"it fails to run ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})"
    for i, (y, (_, shape)) in enumerate(zip(ys, refs, strict=True)):
        if y.shape != shape:
            return f"its output shape changed from {tuple(shape)} to {tuple(y.shape)}"
        if not bool(torch.isfinite(y.float()).all()):
            return "it gives non-finite outputs"
        if masked is not None:
            ref = masked[i].float()
            err = float((y.float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-6)
            if err > rtol:
                return (f"its outputs differ from the original with the same channels zeroed (relative error "
                        f"{err:.2g} > {rtol:g}), so the forward reads a size the tracer cannot follow")
    return None


def verify(pruned: nn.Module, refs: list[tuple[Any, torch.Size]], kind: str,
           masked: list[torch.Tensor] | None = None) -> None:
    """Refuse (one line) a pruned model that fails to run, changes its output shape, gives non-finite
    values, or (with ``masked``) computes something else than the masked original."""
    why = problem(pruned, refs, masked)
    if why is not None:
        raise UnsupportedLayerError(
            f"{kind} refused: the pruned model was checked on the trace batch and {why}; the model's forward "
            "probably uses a size the tracer cannot follow (e.g. a channel count written in Python); "
            "leave those layers out with select / ignore")
